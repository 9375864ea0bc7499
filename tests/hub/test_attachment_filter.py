"""Attachment filtering's rules (mailyard.hub.attachment_filter): Exchange's default entries,
by file name and by content type, wherever a part hides (the message's own body, RFC 2231
continuations, a name Windows trims, an attached message, encoded or not), and what Strip
leaves in the message; and that what cannot be read is refused at the end of DATA."""

from __future__ import annotations

import asyncio
import base64
import quopri
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest

from mailyard.directory import Directory
from mailyard.hub import antispam, attachment_filter
from mailyard.org import AntispamSettings
from tests.conftest import make_org

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


def single_part(*head: str, body: str = "TVqQAAMAAAAEAAAA") -> bytes:
    return "\r\n".join(["From: carol@fabrikam.example", "To: bob@contoso.com", "Subject: files", "MIME-Version: 1.0",
                        *head, "", body, ""]).encode()


def test_a_single_part_message_is_judged_by_its_own_type_and_name() -> None:
    whole = single_part("Content-Type: application/x-msdownload", "Content-Transfer-Encoding: base64")
    assert attachment_filter.findings(whole, SETTINGS) == ["(unnamed) (application/x-msdownload)"]
    named = single_part("Content-Type: application/octet-stream", 'Content-Disposition: attachment; filename = "x.exe"',
                        "Content-Transfer-Encoding: base64")
    assert attachment_filter.findings(named, SETTINGS) == ["x.exe"]
    partial = single_part("Content-Type: message/partial; id=abc; number=1; total=2", body="From: a@b.example\r\n")
    assert attachment_filter.findings(partial, SETTINGS) == ["(unnamed) (message/partial)"]
    assert attachment_filter.findings(single_part("Content-Type: text/plain", body="hello"), SETTINGS) == []


@pytest.mark.parametrize("head", [
    ('Content-Type: application/octet-stream', 'Content-Disposition: attachment; filename*0="evil"; filename*1=".exe"'),
    ("Content-Type: application/octet-stream; name*0*=utf-8''ev; name*1*=il.exe",),
    ("Content-Type: application/octet-stream", "Content-Disposition: attachment; filename*0*=utf-8''evil%2E; filename*1=exe"),
])
def test_rfc_2231_continuations_are_read_as_one_name(head: tuple[str, ...]) -> None:
    assert attachment_filter.findings(single_part(*head, "Content-Transfer-Encoding: base64"), SETTINGS) == ["evil.exe"]


@pytest.mark.parametrize("name", ["evil.exe.", "evil.exe ", "evil.exe . .", "evil.EXE\t", "evil.exe\0.pdf"])
def test_a_name_is_judged_as_windows_saves_it(name: str) -> None:
    found = attachment_filter.findings(with_attachment(name), SETTINGS)
    assert [f.strip() for f in found] == [name.strip()], "(the email package drops whitespace at the ends)"
    assert attachment_filter.findings(with_attachment("evil.exe.pdf"), SETTINGS) == []


def attached_message(inner: bytes, cte: str = "7bit") -> bytes:
    """A message with ``inner`` attached as message/rfc822, its body in ``cte``."""
    body = {"7bit": inner, "base64": base64.encodebytes(inner), "quoted-printable": quopri.encodestring(inner)}[cte]
    return (b"From: carol@fabrikam.example\r\nTo: bob@contoso.com\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=outer\r\n\r\n--outer\r\nContent-Type: text/plain\r\n\r\n"
            b"see the forwarded message\r\n--outer\r\nContent-Type: message/rfc822\r\n"
            b"Content-Disposition: attachment; filename=fwd.eml\r\nContent-Transfer-Encoding: " + cte.encode() +
            b"\r\n\r\n" + body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n--outer--\r\n")


@pytest.mark.parametrize("cte", ["7bit", "base64", "quoted-printable"])
def test_the_attachments_of_an_attached_message_are_judged_encoded_or_not(cte: str) -> None:
    raw = attached_message(with_attachment("invoice.exe"), cte)
    assert attachment_filter.findings(raw, SETTINGS) == ["invoice.exe"]
    assert attachment_filter.findings(attached_message(with_attachment("report.pdf", "application/pdf"), cte),
                                      SETTINGS) == []
    out = attachment_filter.strip(raw, SETTINGS)
    assert out is not None and attachment_filter.findings(out, SETTINGS) == [] and b"TVqQ" not in out
    assert b"see the forwarded message" in out


def test_encoded_attached_messages_are_read_three_deep_and_deeper_is_unacceptable() -> None:
    raw = with_attachment("invoice.exe")
    for _ in range(attachment_filter.MAX_DEPTH):
        raw = attached_message(raw, "base64")
    assert attachment_filter.findings(raw, SETTINGS) == ["invoice.exe"]
    clean = with_attachment("report.pdf", "application/pdf")
    for _ in range(attachment_filter.MAX_DEPTH + 1):
        clean = attached_message(clean, "base64")
    assert attachment_filter.findings(clean, SETTINGS) == ["fwd.eml (attached messages nested over 3 deep)"]


def test_strip_adds_no_mime_version_to_the_part_it_replaces() -> None:
    out = attachment_filter.strip(with_attachment("tool.exe"), SETTINGS)
    assert out is not None and out.count(b"MIME-Version:") == 1
    msg = message_from_bytes(out, policy=policy.default)
    replaced = [p for p in msg.walk() if p.get_filename() == "tool.exe.txt"]
    assert replaced and "MIME-Version" not in replaced[0] and "MIME-Version" in msg
    whole = attachment_filter.strip(single_part("Content-Type: application/x-msdownload",
                                                "Content-Transfer-Encoding: base64"), SETTINGS)
    assert whole is not None and whole.count(b"MIME-Version:") == 1 and b"TVqQ" not in whole


def nested_too_deep(levels: int = 1500) -> bytes:
    """Multiparts within one another, deeper than the email package can read (RecursionError)."""
    opening = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
                       for i in range(levels))
    return (b"From: carol@fabrikam.example\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
            + opening + b"--b%d\r\nContent-Type: application/octet-stream; name=x.exe\r\n\r\nMZ\r\n" % levels)


def test_a_message_the_filter_cannot_read_is_unacceptable_and_refused_even_by_strip() -> None:
    raw = nested_too_deep()
    assert attachment_filter.findings(raw, SETTINGS) == [attachment_filter.UNREADABLE]
    # Strip cannot strip it (strip gives None): refused, not let through. (Each reading of it
    # costs the email package a second: the test reads it no more than it must.)
    org = make_org()
    antispam_settings = org.antispam.model_copy(update={"sender_authentication": False, "content_filtering": False,
                                                        "attachment_action": "Strip"})
    directory = Directory(org.model_copy(update={"antispam": antispam_settings}))

    class Ctx:  # (the refusal's tracking record has no Redis to go to here: logged and dropped, as designed)
        hub, r = "EDGE-01", None

    reply = asyncio.run(antispam.on_data(Ctx(), directory, raw, "192.0.2.1", "carol@fabrikam.example", "mail.example",
                                         "edge.example", ["bob@contoso.com"], original=raw))
    assert reply == "550 5.7.1 Message rejected due to unacceptable attachments"


def flat(parts: int) -> bytes:
    body = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n" for _ in range(parts))
    return (b"From: carol@fabrikam.example\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            + body + b"--b--\r\n")


def test_a_message_of_more_parts_than_anyone_sends_is_not_parsed_and_counts_as_unreadable() -> None:
    assert attachment_filter.findings(flat(400), SETTINGS) == []
    many = flat(attachment_filter.MAX_PARTS + 1)
    assert attachment_filter.findings(many, SETTINGS) == [attachment_filter.UNREADABLE]
    assert attachment_filter.strip(many, SETTINGS) is None
