"""Small, byte-exact edits of a message's header block (no re-serialization of the body)."""

from __future__ import annotations

import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

_FOLD = (b" ", b"\t")


def split(raw: bytes) -> tuple[bytes, bytes]:
    """(header block including its final line break, the rest starting at the blank line)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = raw.find(sep)
        if end >= 0:
            cut = end + len(sep) // 2
            return raw[:cut], raw[cut:]
    return raw, b""


def parse(raw: bytes) -> Message:
    """The headers only, tolerant of whatever a client or peer sent."""
    head, _ = split(raw)
    return BytesHeaderParser(policy=compat32).parsebytes(head)


def addresses(head: Message, field: str) -> list[tuple[str, str]]:
    """The (name, address) pairs of every ``field`` header (From, Sender, To...). Raises
    ValueError for one that cannot be read (3,000 nested parentheses make the email package
    recurse too deeply). Header text in 8-bit octets is read as UTF-8 (RFC 6532), so that an
    internationalized address reads as the characters it is."""
    wanted = field.lower()
    values = [_utf8(v) for name, v in head.raw_items() if name.lower() == wanted]
    try:
        return getaddresses(values)
    except (RecursionError, ValueError, TypeError, IndexError):
        raise ValueError(f"the {field} header cannot be parsed") from None


def text(head: Message, field: str) -> str:
    """The first ``field`` header's value as sent ("" if none), 8-bit octets read as UTF-8
    (RFC 6532; compat32 would give U+FFFD for each octet)."""
    wanted = field.lower()
    return next((_utf8(v) for name, v in head.raw_items() if name.lower() == wanted), "")


def _utf8(value: str) -> str:
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def strip(raw: bytes, *names: str) -> bytes:
    """Remove every occurrence of the named headers (with their folded continuation lines)."""
    head, rest = split(raw)
    wanted = {n.lower().encode() for n in names}
    out, skipping = [], False
    for line in head.splitlines(keepends=True):
        if line.startswith(_FOLD):
            if not skipping:
                out.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        skipping = name in wanted
        if not skipping:
            out.append(line)
    return b"".join(out) + rest


def prepend(raw: bytes, *lines: str) -> bytes:
    return "".join(line.rstrip("\r\n") + "\r\n" for line in lines).encode() + raw


_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)


def hop_count(raw: bytes) -> int:
    """Number of Received headers (the hop count Exchange limits at 30)."""
    head, _ = split(raw)
    return len(_RECEIVED.findall(head))
