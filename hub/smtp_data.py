"""Reading an SMTP DATA section: fast, and exactly as RFC 5321 §4.1.1.4 and §4.5.2 say.

aiosmtpd reads DATA one line at a time, an await and a buffer copy per line (about 80 for a
5 KB message, a third of the receive process's CPU). This reads up to each ``.<CRLF>`` and
checks whether a CRLF came before it, so a message costs a few awaits. The meaning is the
same: lines end in CRLF only, so a bare LF never ends a line and ``<LF>.<LF>`` or
``<LF>.<CRLF>`` cannot end (or split) a message; a leading dot is removed from each line; a
message too large is read to its end and then refused. Line ends and line lengths are the
intake's business (``mailyard.mime.intake``): a bare LF is normalized there, in a message
already read, and a line over 998 octets re-encoded; the session closes on a line of more
than 64 KB (``receive_protocol.MAX_UNBROKEN_LINE``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from mailyard.hub import replies

END = b"\r\n.\r\n"


@dataclass
class Data:
    content: bytes | None  # the message, dots unstuffed; None when refused
    error: str | None = None  # the reply when refused


async def read_data(reader: asyncio.StreamReader, *, size_limit: int | None) -> Data:
    """Read up to and including the terminating ``<CRLF>.<CRLF>`` (the CRLF that ends the
    DATA command counts as the first one, so an empty message is just ``.<CRLF>``)."""
    buffer = bytearray(b"\r\n")
    received = 0
    too_much = False
    while True:
        try:
            chunk = await reader.readuntil(b".\r\n")
        except asyncio.LimitOverrunError as exc:
            # No ".\r\n" in the buffered bytes: take all that cannot be part of one.
            chunk = await reader.readexactly(exc.consumed)
        received += len(chunk)
        buffer += chunk
        if buffer.endswith(END):
            break
        if size_limit and received > size_limit + len(END):
            # Keep reading to the end (the reply comes after it, RFC 5321 §4.2.5), keeping
            # only the tail that may hold the start of the terminator.
            too_much = True
            del buffer[:-len(END)]
    if too_much or (size_limit and received - 3 > size_limit):
        return Data(None, replies.TOO_BIG)
    raw = bytes(buffer[:-3])  # the leading CRLF, the message, without the final ".\r\n"
    return Data(raw.replace(b"\r\n.", b"\r\n")[2:])

