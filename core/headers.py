"""A message's header block: read tolerantly, and edited byte-exactly (no re-serialization of the body)."""

from __future__ import annotations

import re
from collections.abc import Callable
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

from mailyard.addresses import canonical

_FOLD = (b" ", b"\t")
_UNFOLD = re.compile(r"\r?\n(?=[ \t])")


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
    values = [_printable(v) for name, v in head.raw_items() if name.lower() == wanted]
    try:
        return getaddresses(values)
    except (RecursionError, ValueError, TypeError, IndexError):
        raise ValueError(f"the {field} header cannot be parsed") from None


# A listing (a mailbox folder, the demo Internet's mail) shows whatever arrived, from anyone: a
# header the email package cannot parse (it raises IndexError, AttributeError,
# UnboundLocalError... on some, a Message-ID of "<[@x>" among them) or cannot encode (8-bit
# bytes) is shown as its raw text, so one hostile message cannot make the listing fail.


def _printable(text: str) -> str:
    """Text that encodes as UTF-8: 8-bit header bytes decoded as UTF-8 where they are, else U+FFFD."""
    if text.isascii():
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _raw_values(head: Message, name: str) -> list[str]:
    """Every ``name`` header as it came, unfolded (RFC 5322 2.2.3)."""
    return [_UNFOLD.sub("", str(v)) for k, v in head.raw_items() if k.lower() == name.lower()]


def shown_text(head: Message, name: str) -> str:
    """The first ``name`` header as a listing shows it: decoded, else as it came; "" if none."""
    try:
        return _printable(str(head.get(name, "")))
    except Exception:
        return _printable(next(iter(_raw_values(head, name)), ""))


def shown_addresses(head: Message, name: str) -> list[str]:
    """The addresses of every ``name`` header (``"Alice <a@x>, b@y"`` -> ["a@x", "b@y"]) as a
    listing shows them; none for a header too broken to read."""
    try:
        values = [str(v) for v in head.get_all(name, [])]
    except Exception:
        values = _raw_values(head, name)
    try:
        return [_printable(addr) for _, addr in getaddresses(values) if addr]
    except Exception:
        return []


def text(head: Message, field: str) -> str:
    """The first ``field`` header's value as sent ("" if none), 8-bit octets read as UTF-8
    (RFC 6532; compat32 would give U+FFFD for each octet)."""
    wanted = field.lower()
    return next((_printable(v) for name, v in head.raw_items() if name.lower() == wanted), "")


def fields(head: bytes) -> list[list[bytes]]:
    """The header section's fields, each its lines (the first and its folded continuations)."""
    fields: list[list[bytes]] = []
    for line in head.splitlines(keepends=True):
        if line.startswith(_FOLD) and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    return fields


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


def strip_if(raw: bytes, name: str, drop: Callable[[str], bool]) -> bytes:
    """Remove the ``name`` fields whose value (unfolded, as text) ``drop`` says to."""
    wanted = name.lower().encode()

    def value(lines: list[bytes]) -> str:
        return b" ".join(b"".join(lines).split(b":", 1)[-1].split()).decode("utf-8", "replace")
    return _strip_where(raw, lambda found, lines: found == wanted and drop(value(lines)))


def _strip_where(raw: bytes, drop: Callable[[bytes, list[bytes]], bool]) -> bytes:
    head, rest = split(raw)
    out = []
    for lines in fields(head):
        first = lines[0]
        name = first.split(b":", 1)[0].strip().lower() if b":" in first else b""
        if not (name and drop(name, lines)):
            out += lines
    return b"".join(out) + rest


def prepend(raw: bytes, *lines: str) -> bytes:
    return "".join(line.rstrip("\r\n") + "\r\n" for line in lines).encode() + raw


_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)


def first_value(raw: bytes, name: str) -> bytes | None:
    """The value of the first ``name`` field, unfolded and stripped, without parsing the rest
    (a regular expression over the header block: cheap on every message)."""
    head, _ = split(raw)
    found = re.search(rb"^" + re.escape(name.encode()) + rb"[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)", head,
                      re.IGNORECASE | re.MULTILINE)
    return b" ".join(found.group(1).split()) if found else None


def hop_count(raw: bytes) -> int:
    """Number of Received headers (the hop count Exchange limits at 30)."""
    head, _ = split(raw)
    return len(_RECEIVED.findall(head))


_FIELD_LINE = re.compile(rb"[!-9;-~]+:")  # RFC 5322 2.2: printable ASCII but colon, then a colon


def malformed_line(head: bytes) -> tuple[int, str] | None:
    """The first line of a header section (``head``, without the blank line) that is neither
    a field (name: value) nor the fold of one, as (its number from 1, its start); None if every
    line is. What the email package would skip (``From :`` taken for an mbox separator, a line
    without a colon that ends its reading early) a mail client may still show."""
    lines = head.replace(b"\r\n", b"\n").rstrip(b"\n").split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not (_FIELD_LINE.match(line) or (number > 1 and line[:1] in (b" ", b"\t"))):
            return number, line[:60].decode("ascii", "replace")
    return None


def from_domain(raw: bytes) -> str | None:
    """The domain of a message's one From address (canonical), None if it has none, several,
    or one that does not parse (DKIM signs by it, DMARC judges by it)."""
    try:
        addresses = [a for _, a in getaddresses(parse(raw).get_all("From") or []) if "@" in a]
    except (RecursionError, ValueError, TypeError):
        return None
    if len(addresses) != 1:
        return None
    try:
        return canonical(addresses[0]).rpartition("@")[2]
    except ValueError:
        return None
