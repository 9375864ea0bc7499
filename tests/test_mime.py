"""A message's transfer form: bare LF, lines over 998 octets, 8-bit downgrade (mailyard.mime)."""

from __future__ import annotations

import email
from email import policy

from mailyard import mime

LONG = b"x" * 1500


def parsed(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def lines(raw: bytes) -> list[bytes]:
    assert b"\n" not in raw.replace(b"\r\n", b""), "a bare LF or CR"
    return raw.split(b"\r\n")


def test_a_message_that_is_fine_comes_back_as_the_same_bytes() -> None:
    raw = b"Subject: fine\r\nFrom: a@b.example\r\n\r\ncaf\xc3\xa9\r\n"
    assert mime.intake(raw) is raw


def test_bare_lf_line_ends_become_crlf_and_a_dot_line_stays_content() -> None:
    assert mime.intake(b"Subject: a\nTo: b@c.example\n\nline\n.\nend\r\n") == \
        b"Subject: a\r\nTo: b@c.example\r\n\r\nline\r\n.\r\nend\r\n"


def test_a_long_body_line_is_quoted_printable_and_decodes_to_the_same_text() -> None:
    raw = b"Subject: long\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nshort\r\n" + LONG + b"\r\n"
    out = mime.intake(raw)
    assert isinstance(out, bytes) and max(map(len, lines(out))) <= 76
    msg = parsed(out)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert msg.get_payload(decode=True) == b"short\r\n" + LONG + b"\r\n"
    assert msg["Subject"] == "long"


def test_only_the_part_with_the_long_line_is_re_encoded() -> None:
    raw = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
           b"Content-Type: text/plain\r\n\r\nkept as it is\r\n--B\r\nContent-Type: text/csv\r\n\r\n" + LONG
           + b"\r\n--B--\r\n")
    out = mime.intake(raw)
    assert isinstance(out, bytes)
    first, second = parsed(out).iter_parts()
    assert "Content-Transfer-Encoding" not in first and first.get_content() == "kept as it is"
    assert second["Content-Transfer-Encoding"] == "quoted-printable"
    assert second.get_payload(decode=True).rstrip(b"\r\n") == LONG


def test_a_long_header_line_is_named_not_re_encoded() -> None:
    problem = mime.intake(b"Subject: ok\r\nX-Long: " + LONG + b"\r\n\r\nbody\r\n")
    assert problem == mime.LongHeaderLine(2, 1508)
    assert str(problem) == "header line 2 is 1508 octets long; at most 998 may cross SMTP"


def test_downgrade_makes_8bit_body_and_headers_7bit_mime() -> None:
    raw = (b"From: J\xc3\xbcrgen <j@x.example>\r\nSubject: caf\xc3\xa9\r\nContent-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xc3\xa9 cr\xc3\xa8me\r\n")
    out = mime.downgrade(raw)
    assert out.isascii()
    msg = parsed(out)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert msg.get_content() == "café crème\r\n"
    assert (msg["Subject"], str(msg["From"])) == ("café", "Jürgen <j@x.example>")
    assert mime.downgrade(b"Subject: ascii\r\n\r\nhi\r\n") == b"Subject: ascii\r\n\r\nhi\r\n"


def test_utf8_message_is_detected_from_addresses_and_header_text() -> None:
    assert mime.utf8_message("jürgen@contoso.com", ["bob@contoso.com"], b"Subject: x\r\n\r\n")
    assert mime.utf8_message("a@contoso.com", ["b@contoso.com"], b"Subject: caf\xc3\xa9\r\n\r\n")
    assert not mime.utf8_message("a@contoso.com", ["b@contoso.com"], b"Subject: x\r\n\r\ncaf\xc3\xa9")


def nested(depth: int, leaf: bytes) -> bytes:
    """A message of ``depth`` multipart/mixed parts, one inside the other, around ``leaf``."""
    head = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i) for i in range(depth))
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return b"Subject: deep\r\nMIME-Version: 1.0\r\n" + head + b"Content-Type: text/plain\r\n\r\n" + leaf + tail


def test_parts_nested_too_deeply_to_read_are_named_not_a_crash() -> None:
    assert isinstance(mime.intake(nested(1500, b"x" * 1200 + b"\r\n")), mime.TooDeep)
    assert isinstance(mime.downgrade(nested(1500, "\u00e9t\u00e9\r\n".encode())), mime.TooDeep)
    assert "nested too deeply" in str(mime.TooDeep())
    # (a few levels are nothing special)
    assert isinstance(mime.intake(nested(5, b"x" * 1200 + b"\r\n")), bytes)
