"""A message's transfer form: line ends, line lengths and 8-bit octets (RFC 5321 §4.5.3.1.6,
RFC 2045, RFC 6152), and the two re-encodings Mailyard makes, with the email package.

- On the way in (``intake``), once: bare LF line ends become CRLF, and a body part with a
  line over 998 octets is re-encoded as quoted-printable, so the message can cross any SMTP
  link afterwards (Mailyard's own between sites, any peer on the Internet): whether mail
  arrives never depends on where its recipient is. A header line over 998 octets cannot be
  re-encoded without changing what the header says; it is refused (``long_header_line``).
- On the way out to a peer without 8BITMIME (``downgrade``): every body part with 8-bit
  octets becomes quoted-printable and 8-bit header text becomes RFC 2047 encoded words.

Only what needs it is touched: a message that is already fine comes back as the same bytes,
and a re-encoded one keeps its other parts and headers as they were.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from email import encoders
from email.generator import BytesGenerator
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.policy import SMTP, EmailPolicy

MAX_LINE = 998  # octets, without the CRLF (RFC 5321 4.5.3.1.6, RFC 5322 2.1.1)

# Parsing and writing again: CRLF line ends, and only a header whose source line is too long
# is refolded (none is, by the time a message is re-encoded: see long_header_line).
_POLICY = SMTP.clone(max_line_length=MAX_LINE)
_SEVEN_BIT = _POLICY.clone(cte_type="7bit")  # and 8-bit header text as RFC 2047 encoded words
_BARE_LF = re.compile(rb"(?<!\r)\n")
_IDENTITY = frozenset({"", "7bit", "8bit", "binary"})  # transfer encodings that leave octets as they are


class Unfit:
    """Why a message cannot be taken in as it is (its ``str`` says so, for the reply)."""


class TooDeep(Unfit):
    """MIME parts nested deeper than the email package can read (Python's recursion limit)."""

    def __str__(self) -> str:
        return "its MIME parts are nested too deeply to be read"


@dataclass(frozen=True)
class LongHeaderLine(Unfit):
    """A header line too long for SMTP (``number`` counts from 1)."""

    number: int
    length: int

    def __str__(self) -> str:
        return f"header line {self.number} is {self.length} octets long; at most {MAX_LINE} may cross SMTP"


def split(raw: bytes) -> tuple[bytes, bytes]:
    """(the header section with its final CRLF, the body after the empty line)."""
    end = raw.find(b"\r\n\r\n")
    return (raw, b"") if end < 0 else (raw[:end + 2], raw[end + 4:])


def utf8_message(sender: str, recipients: list[str], raw: bytes) -> bool:
    """Whether a message that came without SMTP (from a mailbox: no MAIL FROM parameter to say
    so) is an SMTPUTF8 message (RFC 6531): a non-ASCII address in its envelope, or non-ASCII
    header text, as Postfix's ``smtputf8_autodetect_classes`` decides for local submissions."""
    return not (sender.isascii() and all(r.isascii() for r in recipients) and split(raw)[0].isascii())


def normalize_line_ends(raw: bytes) -> bytes:
    """Bare LF line ends as CRLF (what Postfix's ``smtpd_forbid_bare_newline = normalize``
    does). A DATA section still ends only at CRLF.CRLF (``hub.smtp_data``): this runs on a
    message already read, so a bare LF can make no line of it end the message."""
    if raw.count(b"\n") == raw.count(b"\r\n"):
        return raw
    return _BARE_LF.sub(b"\r\n", raw)


def long_header_line(raw: bytes) -> LongHeaderLine | None:
    """The first header line over 998 octets of a CRLF message, or None."""
    head, _ = split(raw)
    if len(head) <= MAX_LINE:
        return None
    for number, line in enumerate(head.split(b"\r\n"), start=1):
        if len(line) > MAX_LINE:
            return LongHeaderLine(number, len(line))
    return None


def _too_long(data: bytes) -> bool:
    return len(data) > MAX_LINE and max(map(len, data.split(b"\r\n"))) > MAX_LINE


def intake(raw: bytes) -> bytes | Unfit:
    """A message as it enters the organization: CRLF line ends, and quoted-printable for any
    body part with a line over 998 octets; or why it is refused: a header line over 998 octets
    (a header cannot be re-encoded without changing what it says), parts nested too deeply."""
    raw = normalize_line_ends(raw)
    if problem := long_header_line(raw):
        return problem
    if not _too_long(split(raw)[1]):
        return raw
    try:
        return _reencode(raw, _too_long, _POLICY)
    except RecursionError:
        return TooDeep()


def downgrade(raw: bytes) -> bytes | TooDeep:
    """A message with 8-bit octets as 7-bit MIME, for a peer without 8BITMIME (RFC 6152 §3):
    quoted-printable body parts, RFC 2047 header text; TooDeep if it cannot be read."""
    if raw.isascii():
        return raw
    try:
        return _reencode(raw, lambda payload: not payload.isascii(), _SEVEN_BIT)
    except RecursionError:
        return TooDeep()


def _reencode(raw: bytes, wanted: Callable[[bytes], bool], policy: EmailPolicy[EmailMessage]) -> bytes:
    msg = BytesParser(policy=_POLICY).parsebytes(raw)
    changed = False
    for part in msg.walk():
        cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
        if part.is_multipart():
            if cte in ("8bit", "binary") and policy is _SEVEN_BIT:  # its parts are 7-bit now
                part.replace_header("Content-Transfer-Encoding", "7bit")
            continue
        if cte not in _IDENTITY:
            continue  # base64 or quoted-printable already: its lines are short and 7-bit
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes) or not wanted(payload):
            continue
        _quote(part, payload)
        changed = True
    if policy is _SEVEN_BIT:
        _utf8_headers(msg)
    elif not changed:
        return raw
    if "MIME-Version" not in msg:
        msg["MIME-Version"] = "1.0"
    out = io.BytesIO()
    BytesGenerator(out, policy=policy).flatten(msg)
    return out.getvalue()


def _quote(part: Message, payload: bytes) -> None:
    """Re-encode one leaf part as quoted-printable (the email package's encoder)."""
    if "Content-Type" not in part and not payload.isascii() and _is_utf8(payload):
        part["Content-Type"] = 'text/plain; charset="utf-8"'  # what its octets say they are
    del part["Content-Transfer-Encoding"]
    part.set_payload(payload)
    encoders.encode_quopri(part)


def _utf8_headers(msg: Message) -> None:
    """Header values with 8-bit octets that are UTF-8, read as such, so that they are written
    as ``=?utf-8?...?=`` encoded words (other octets as ``unknown-8bit`` ones)."""
    for part in msg.walk():
        raw_items = list(part.raw_items())
        if all(value.isascii() for _, value in raw_items):
            continue
        for name in {name for name, _ in raw_items}:
            del part[name]
        for name, value in raw_items:
            if value.isascii():
                part.set_raw(name, value)
                continue
            octets = value.encode("ascii", "surrogateescape")
            try:
                part[name] = " ".join(octets.decode("utf-8").split())
            except (UnicodeDecodeError, ValueError, IndexError):
                part.set_raw(name, value)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
