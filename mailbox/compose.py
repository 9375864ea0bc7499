"""Write the plain message most "Send" requests describe, without the email package.

A client that sends JSON (to, cc, bcc, subject, body) almost always sends plain addresses, a
short ASCII subject and an ASCII body of short lines. The email package builds that message
through its header registry, folder and generator at about 0.8 ms of CPU, a fifth of the
mailbox server's cost per Send (issue 13's profile). For that case the bytes are fixed by
RFC 5322 alone, and ``plain_message`` writes them directly: the same bytes the email package
writes (tests/mailbox/test_compose.py holds the two to each other). Anything else (a display
name, a long or non-ASCII line, a header that would need folding or encoding) returns None,
and the caller builds the message with the email package as before.
"""

from __future__ import annotations

import binascii
import re
from email import quoprimime

# RFC 5322 3.2.3's atext, dot-atoms on both sides of the @ (RFC 5322 3.4.1's addr-spec
# without quoted local parts or domain literals: those go the long way)
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATOM}(?:\.{_ATOM})*"
_ADDRESS = re.compile(rf"{_DOT_ATOM}@{_DOT_ATOM}")
_MESSAGE_ID = re.compile(rf"<{_DOT_ATOM}@{_DOT_ATOM}>")
# Printable ASCII, no space at either end or twice in a row, nothing an encoded word starts with
_SUBJECT = re.compile(r"[!-~]+(?: [!-~]+)*")
_MAX_LINE = 78  # the email package's max_line_length: longer header lines get folded
_CONTENT_TYPE = b'Content-Type: text/plain; charset="utf-8"\r\n'


def plain_message(sender: str, recipients: dict[str, list[str]], subject: str,
                  message_id: str | None, text: str) -> bytes | None:
    """The message's bytes, CRLF line ends, or None when the email package must build it.

    ``recipients`` maps header names (To, Cc, Bcc) to addresses, in the order they are written."""
    if not _ADDRESS.fullmatch(sender) or "=?" in sender:  # (an encoded word: the package decodes it)
        return None
    lines = [f"From: {sender}"]
    for name, addresses in recipients.items():
        if addresses:
            if not all(_ADDRESS.fullmatch(a) and "=?" not in a for a in addresses):
                return None
            lines.append(f"{name}: {', '.join(addresses)}")
    if (subject and not _SUBJECT.fullmatch(subject)) or "=?" in subject:
        return None
    lines.append(f"Subject: {subject}" if subject else "Subject:")
    if message_id is not None:
        if not _MESSAGE_ID.fullmatch(message_id):
            return None
        lines.append(f"Message-ID: {message_id}")
    if any(len(line) > _MAX_LINE for line in lines) or (body := _body(text)) is None:
        return None
    encoding, content = body
    return ("\r\n".join(lines).encode("ascii") + b"\r\n" + _CONTENT_TYPE
            + b"Content-Transfer-Encoding: " + encoding + b"\r\nMIME-Version: 1.0\r\n\r\n" + content)


def _body(text: str) -> tuple[bytes, bytes] | None:
    """The transfer encoding and the encoded body, CRLF line ends, as ``set_content`` chooses
    them (email.contentmanager): 7bit when every line is short, else quoted-printable unless
    base64 is shorter on the first ten lines. Not ASCII, or base64: None."""
    if not text.isascii():
        return None
    lines = text.encode("ascii").splitlines()  # split at CR, LF and CRLF only, as the package does
    if all(len(line) <= _MAX_LINE for line in lines):
        return b"7bit", b"\r\n".join(lines) + b"\r\n"
    sniff = b"\n".join(lines[:10]) + b"\n"
    if len(quoprimime.body_encode(sniff.decode("ascii"), _MAX_LINE)) > len(binascii.b2a_base64(sniff)):
        return None
    encoded = quoprimime.body_encode((b"\n".join(lines) + b"\n").decode("ascii"), _MAX_LINE)
    return b"quoted-printable", encoded.replace("\n", "\r\n").encode("ascii")
