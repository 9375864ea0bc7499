"""Attachment filtering's rules (mailyard.hub.attachment_filter): Exchange's default entries,
by file name and by content type, and what Strip leaves in the message."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage

from mailyard.hub import attachment_filter
from mailyard.org import AntispamSettings

SETTINGS = AntispamSettings()


def with_attachment(name: str, content_type: str = "application/octet-stream") -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "carol@fabrikam.example", "bob@contoso.com", "files"
    msg.set_content("see attached\n")
    maintype, subtype = content_type.split("/")
    msg.add_attachment(b"MZ\x90\x00binary", maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def test_the_default_entries_find_executables_by_name_in_any_case_and_by_type() -> None:
    assert attachment_filter.findings(with_attachment("Invoice.EXE"), SETTINGS) == ["Invoice.EXE"]
    assert attachment_filter.findings(with_attachment("run.ps1"), SETTINGS) == ["run.ps1"]
    assert attachment_filter.findings(with_attachment("x.bin", "application/x-msdownload"), SETTINGS) == [
        "x.bin (application/x-msdownload)"]
    assert attachment_filter.findings(with_attachment("report.pdf", "application/pdf"), SETTINGS) == []


def test_a_plain_message_is_not_parsed_and_the_filter_can_be_off() -> None:
    assert attachment_filter.findings(b"Subject: hi\r\n\r\nno attachments here\r\n", SETTINGS) == []
    off = SETTINGS.model_copy(update={"attachment_filtering": False})
    assert attachment_filter.findings(with_attachment("a.exe"), off) == []


def test_strip_replaces_the_attachment_with_the_admin_message_and_keeps_the_rest() -> None:
    out = attachment_filter.strip(with_attachment("tool.exe"), SETTINGS)
    msg = message_from_bytes(out, policy=policy.default)
    parts = [p for p in msg.walk() if not p.is_multipart()]
    assert parts[0].get_content().strip() == "see attached"
    assert parts[1].get_filename() == "tool.exe.txt"
    assert parts[1].get_content().strip() == "This attachment was removed."
    assert b"MZ" not in out and attachment_filter.findings(out, SETTINGS) == []
