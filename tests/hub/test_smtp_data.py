"""Reading a DATA section: where it ends, what it holds, and when it is refused."""

from __future__ import annotations

import asyncio

import pytest

from mailyard.hub import replies
from mailyard.hub.smtp_data import Data, read_data


def read(*pieces: bytes, size_limit: int | None = None, line_limit: int = 1001) -> tuple[Data, bytes]:
    """Feed the pieces as separate arrivals (as TCP may split them) to a reader limited like
    aiosmtpd's; returns what was read and what is left for the next command."""

    async def go() -> tuple[Data, bytes]:
        reader = asyncio.StreamReader(limit=line_limit)

        async def feed() -> None:
            for piece in pieces:
                reader.feed_data(piece)
                await asyncio.sleep(0)
            reader.feed_eof()

        feeder = asyncio.ensure_future(feed())
        data = await read_data(reader, size_limit=size_limit)
        await feeder
        return data, await reader.read()

    return asyncio.run(go())


def test_an_empty_message_is_a_lone_dot() -> None:
    assert read(b".\r\nQUIT\r\n") == (Data(b""), b"QUIT\r\n")


def test_the_message_ends_at_the_first_crlf_dot_crlf_and_what_follows_is_left_for_the_next_command() -> None:
    data, rest = read(b"Subject: a\r\n\r\nbody\r\n.\r\nMAIL FROM:<a@b>\r\n")
    assert data == Data(b"Subject: a\r\n\r\nbody\r\n")
    assert rest == b"MAIL FROM:<a@b>\r\n"


def test_leading_dots_are_removed_from_every_line() -> None:
    data, _ = read(b"..first\r\nmiddle.\r\n..\r\n...x\r\n.\r\n")
    assert data.content == b".first\r\nmiddle.\r\n.\r\n..x\r\n"


@pytest.mark.parametrize("smuggled", [b"a\n.\nb\r\n", b"a\n.\r\nb\r\n", b"a\r.\r\nb\r\n", b"a\r\n\r.\r\nb\r\n"])
def test_a_dot_line_that_is_not_between_two_crlfs_does_not_end_the_message(smuggled: bytes) -> None:
    data, rest = read(smuggled + b".\r\n")
    assert data.content == smuggled, "a bare LF or CR must never end (or split) a message"
    assert rest == b""


def test_a_dot_then_a_bare_lf_is_a_line_with_a_leading_dot_not_the_end() -> None:
    assert read(b"a\r\n.\nb\r\n.\r\n") == (Data(b"a\r\n\nb\r\n"), b"")


def test_the_terminator_is_found_however_the_bytes_arrive() -> None:
    raw = b"Subject: x\r\n\r\n" + b"line of text.\r\n" * 200 + b"..dotted\r\n.\r\nQUIT\r\n"
    expected = b"Subject: x\r\n\r\n" + b"line of text.\r\n" * 200 + b".dotted\r\n"
    for size in (1, 2, 3, 5, 7, 1000, 4096):
        pieces = [raw[i:i + size] for i in range(0, len(raw), size)]
        assert read(*pieces) == (Data(expected), b"QUIT\r\n"), f"split every {size} bytes"


def test_a_message_at_the_size_limit_is_accepted_and_one_byte_more_is_refused_after_its_end() -> None:
    body = b"x" * 98 + b"\r\n"  # 100 bytes
    assert read(body + b".\r\n", size_limit=100)[0].content == body
    data, rest = read(b"y" + body + b".\r\nQUIT\r\n", size_limit=100)
    assert (data.content, data.error, rest) == (None, replies.TOO_BIG, b"QUIT\r\n")


def test_a_much_larger_message_is_read_to_its_end_without_being_kept() -> None:
    data, rest = read(*[b"z" * 998 + b"\r\n"] * 5000, b".\r\nQUIT\r\n", size_limit=10_000)
    assert (data.error, rest) == (replies.TOO_BIG, b"QUIT\r\n")


def test_a_long_line_is_read_whole_for_the_intake_to_re_encode() -> None:
    # No line limit here: a line over 998 octets is re-encoded on the way in (mailyard.mime.intake)
    data, rest = read(b"ok\r\n" + b"w" * 1000 + b"\r\n.\r\nQUIT\r\n")
    assert (data.content, rest) == (b"ok\r\n" + b"w" * 1000 + b"\r\n", b"QUIT\r\n")


def test_a_connection_that_ends_inside_data_raises() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        read(b"Subject: cut\r\n\r\nhalf a messa")
