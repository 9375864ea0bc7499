"""Attachment filtering, the last of the Edge's agents (Exchange's Attachment Filtering agent,
end of DATA): an attachment whose file name matches an entry (``*.exe``) or whose content type
is listed (``application/x-msdownload``) gets the configured action:

- ``Reject`` (the default, as Set-AttachmentFilterListConfig's): ``550 5.7.1`` and the
  RejectResponse ("Message rejected due to unacceptable attachments");
- ``Strip``: each such attachment is replaced by a text file, ``<name>.txt``, holding the
  AdminMessage ("This attachment was removed."), and the message is delivered;
- ``SilentDelete``: the message is taken (``250``) and dropped.

The entries default to Exchange's list (reference §3; ``mailyard.org``). Parts are found with the email package;
a message without a multipart body or a named part is not parsed at all.
"""

from __future__ import annotations

import fnmatch
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser

from mailyard.org import AntispamSettings


def _candidate(raw: bytes) -> bool:
    """Could ``raw`` hold an attachment? (Cheap: most mail is one plain part.)"""
    lowered = raw[:1 << 20].lower()
    return b"multipart/" in lowered or b"name=" in lowered or b"name*=" in lowered


def _unacceptable(part: Message, settings: AntispamSettings) -> str | None:
    """Why this part is unacceptable ("name.exe", "application/hta"), or None."""
    name = part.get_filename() or ""
    lowered = name.lower()
    if name and any(fnmatch.fnmatchcase(lowered, pattern.lower()) for pattern in settings.attachment_file_names):
        return name
    content_type = part.get_content_type().lower()
    if content_type in (t.lower() for t in settings.attachment_content_types):
        return f"{name or '(unnamed)'} ({content_type})"
    return None


def findings(raw: bytes, settings: AntispamSettings) -> list[str]:
    """The unacceptable attachments of a message (empty: none, or the filter is off)."""
    if not settings.attachment_filtering or not _candidate(raw):
        return []
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    return [why for part in msg.walk() if not part.is_multipart() and (why := _unacceptable(part, settings))]


def strip(raw: bytes, settings: AntispamSettings) -> bytes:
    """``raw`` with every unacceptable attachment replaced by a text file of the AdminMessage."""
    msg = BytesParser(policy=policy.default).parsebytes(raw)
    for part in msg.walk():
        if part.is_multipart() or not _unacceptable(part, settings) or not isinstance(part, EmailMessage):
            continue
        name = (part.get_filename() or "attachment") + ".txt"
        for header in ("Content-Type", "Content-Transfer-Encoding", "Content-Disposition"):
            del part[header]
        part.set_content(settings.attachment_admin_message + "\n", disposition="attachment", filename=name)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
