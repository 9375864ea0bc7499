"""Attachment filtering, the last of the Edge's agents (Exchange's Attachment Filtering agent,
end of DATA): an attachment whose file name matches an entry (``*.exe``) or whose content type
is listed (``application/x-msdownload``) gets the configured action:

- ``Reject`` (the default, as Set-AttachmentFilterListConfig's): ``550 5.7.1`` and the
  RejectResponse ("Message rejected due to unacceptable attachments");
- ``Strip``: each such attachment is replaced by a text file, ``<name>.txt``, holding the
  AdminMessage ("This attachment was removed."), and the message is delivered;
- ``SilentDelete``: the message is taken (``250``) and dropped.

The entries default to Exchange's list (reference §3; ``mailyard.org``). Parts are found with
the email package, which reads RFC 2231 parameters (``filename*0=``, ``name*0*=``) as one name.
Every part but a multipart container is judged, the message itself included (a body that is
all ``application/x-msdownload``, or a top-level ``Content-Disposition`` naming ``x.exe``):
a single-part message is judged by its header section alone, without parsing its body.

A name is judged as Windows would save it: cut at a NUL, its trailing dots and spaces dropped
(``evil.exe.`` is ``evil.exe``). An attached message (``message/rfc822``) is judged with its
own attachments; one sent base64 or quoted-printable (which RFC 2046 forbids and the email
package does not decode) is decoded and read, to MAX_DEPTH such messages deep; deeper counts
as unacceptable, as does a message the email package cannot read (too deeply nested, say)
or one of more than MAX_PARTS parts: what cannot be looked into is not let through. Strip
replaces such an attached message whole.
"""

from __future__ import annotations

import fnmatch
import re
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser

from mailyard.org import AntispamSettings

MAX_DEPTH = 3  # encoded attached messages read within one another
# More parts than any mail a person sends: not parsed at all (the email package takes a second
# of CPU on a thousand nested parts, and an attacker could send such mail in a stream)
MAX_PARTS = 500
_PART_HEADER = re.compile(rb"(?im)^content-type[ \t]*:")
UNREADABLE = "(a message the attachment filter cannot read)"
_ENCODED = ("base64", "quoted-printable")
_TRAILING = re.compile(r"[\s.]+$")


def _cte(part: Message) -> str:
    return str(part.get("Content-Transfer-Encoding", "")).strip().lower()


def _is_encoded_message(part: Message) -> bool:
    """An attached message (message/rfc822, message/global...) sent base64 or quoted-printable."""
    return part.get_content_type().startswith("message/") and _cte(part) in _ENCODED


class _Part(EmailMessage):
    """A part as the filter reads it. The parser descends into every message/* part, encoded
    or not, and reads an encoded one's text as a message without a header, whose attachments
    no one sees. It asks this right after a part's header: an encoded message/* part is opaque
    to it, its body kept as it came, for _encoded_message to decode (and Strip to write back)."""

    def get_content_maintype(self) -> str:
        return "application" if _is_encoded_message(self) else super().get_content_maintype()


_POLICY = policy.default.clone(message_factory=_Part)


def _parse(raw: bytes, *, headersonly: bool = False) -> EmailMessage:
    msg = BytesParser(policy=_POLICY).parsebytes(raw, headersonly=headersonly)
    assert isinstance(msg, EmailMessage)
    return msg


def _saved_name(name: str) -> str:
    """The name Windows would save the file under: at a NUL it ends, and trailing dots and
    spaces it drops, so ``evil.exe.`` and ``evil.exe\\0.pdf`` both run as ``evil.exe``."""
    return _TRAILING.sub("", name.split("\0", 1)[0])


def _unacceptable(part: Message, settings: AntispamSettings) -> str | None:
    """Why this part is unacceptable ("name.exe", "application/hta"), or None."""
    name = part.get_filename() or ""
    lowered = _saved_name(name).lower()
    if lowered and any(fnmatch.fnmatchcase(lowered, pattern.lower()) for pattern in settings.attachment_file_names):
        return name
    content_type = part.get_content_type().lower()
    if content_type in (t.lower() for t in settings.attachment_content_types):
        return f"{name or '(unnamed)'} ({content_type})"
    return None


def _encoded_message(part: Message) -> EmailMessage | None:
    """The message an attached message part holds in base64 or quoted-printable, decoded and
    parsed; None for any other part."""
    if not _is_encoded_message(part) or part.is_multipart():
        return None
    decoded = part.get_payload(decode=True)  # (the email package's decoding, as for any other part)
    return _parse(decoded if isinstance(decoded, bytes) else b"")


def _findings(msg: Message, settings: AntispamSettings, depth: int) -> list[str]:
    out = []
    for part in msg.walk():
        if part.get_content_maintype() != "multipart" and (why := _unacceptable(part, settings)):
            out.append(why)
        elif (inner := _encoded_message(part)) is not None:
            if depth >= MAX_DEPTH:
                out.append(f"{part.get_filename() or '(unnamed)'} (attached messages nested over {MAX_DEPTH} deep)")
            else:
                out += _findings(inner, settings, depth + 1)
    return out


def _too_many_parts(raw: bytes) -> bool:
    return sum(1 for _ in _PART_HEADER.finditer(raw)) > MAX_PARTS


def findings(raw: bytes, settings: AntispamSettings) -> list[str]:
    """The unacceptable attachments of a message (empty: none, or the filter is off)."""
    if not settings.attachment_filtering:
        return []
    if _too_many_parts(raw):
        return [UNREADABLE]
    try:
        head = _parse(raw, headersonly=True)
        if head.get_content_type().partition("/")[0] not in ("multipart", "message"):  # (the body is the only part)
            why = _unacceptable(head, settings)
            return [why] if why else []
        return _findings(_parse(raw), settings, 0)
    except Exception:  # (RecursionError on deep nesting, and what hostile headers make the parser raise)
        return [UNREADABLE]


def _replace(part: EmailMessage, settings: AntispamSettings, *, root: bool) -> None:
    """Make ``part`` the text file of the AdminMessage. MIME-Version belongs to a message's
    header only (set_content adds one, as add_attachment did): a part keeps none."""
    name = (part.get_filename() or "attachment") + ".txt"
    for header in ("Content-Type", "Content-Transfer-Encoding", "Content-Disposition"):
        del part[header]
    part.set_content(settings.attachment_admin_message + "\n", disposition="attachment", filename=name)
    if not root:
        del part["MIME-Version"]


def _strip_parts(msg: EmailMessage, settings: AntispamSettings) -> None:
    roots = {id(msg)}  # (the message, and each attached one the parser read)
    for part in msg.walk():  # (a part replaced is not descended into: walk asks after the yield)
        if part.get_content_maintype() == "message" and part.is_multipart():
            roots.update(id(inner) for inner in part.get_payload())
        if not isinstance(part, EmailMessage) or part.get_content_maintype() == "multipart":
            continue
        inner = _encoded_message(part)
        if _unacceptable(part, settings) or (inner is not None and _findings(inner, settings, 1)):
            _replace(part, settings, root=id(part) in roots)


def strip(raw: bytes, settings: AntispamSettings) -> bytes | None:
    """``raw`` with every unacceptable attachment replaced by a text file of the AdminMessage;
    None for a message that cannot be read (to be refused: what cannot be stripped stays out)."""
    if _too_many_parts(raw):
        return None
    try:
        msg = _parse(raw)
        _strip_parts(msg, settings)
        return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    except Exception:
        return None
