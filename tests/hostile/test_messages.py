"""Hostile messages through the whole pipeline, end to end: submitted raw (RFC 5322) through the
mailbox API, and received over SMTP on the Internet connector (127.0.0.2), to bob's Inbox.

No Message-ID (one is added), duplicate headers (kept), broken MIME (no boundary, a boundary
that never comes), 8-bit headers and body, NUL bytes, a 10 MB attachment (delivered), and a
message at exactly the size limit and one byte over. Each one either arrives with its bytes
intact (the delivered file ends with exactly the bytes that were sent) or is refused with a
clear status (a 4xx/5xx of the API or of SMTP, or an NDR); none is lost silently, and every
process is still running afterwards.
"""

from __future__ import annotations

import email
import os
import smtplib
import uuid
from email import policy
from email.message import EmailMessage
from email.utils import formatdate

import pytest

from mailyard.org import Organization
from mailyard.testing.cluster import Cluster
from mailyard.testing.waiting import wait_until
from tests.conftest import make_org
from tests.hostile.helpers import INTERNET_SOURCE, running_site

SMALL = 64 * 1024  # the size limit of the small site: organization and Internet connector alike


def with_internet_limit(org: Organization, size: str) -> Organization:
    data = org.model_dump(mode="json")
    for connector in data["receive_connectors"]:
        if connector["name"] == "Internet":
            connector["max_message_size"] = size
    return Organization.model_validate(data)


@pytest.fixture(scope="module")
def site(redis_server, tmp_path_factory):
    """Room for a 10 MB attachment: 20 MB limits."""
    org = with_internet_limit(make_org(max_message_size=20 * 1024 * 1024), "20MB")
    with running_site(redis_server, tmp_path_factory.mktemp("messages"), org, mailboxes=["MBX-AMS-01"]) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def small(redis_server, tmp_path_factory):
    """A 64 KB limit, the same for the organization and the Internet connector."""
    org = with_internet_limit(make_org(max_message_size=SMALL), "64KB")
    with running_site(redis_server, tmp_path_factory.mktemp("small"), org, mailboxes=["MBX-AMS-01"],
                      hub="rx-small") as cluster:
        yield cluster


def token() -> str:
    return uuid.uuid4().hex[:10]


def find(site: Cluster, address: str, needle: str, folder: str = "Inbox", timeout: float = 60) -> bytes:
    """The raw bytes of the one item whose subject contains ``needle`` (waiting for it)."""
    def found() -> list[dict]:
        return [i for i in site.folder(address, folder) if needle in i["subject"]]
    (item,) = wait_until(found, timeout=timeout, message=lambda: f"{needle!r} in {address}/{folder}: "
                         f"{[i['subject'] for i in site.folder(address, folder)]}\n{site.all_logs(30)}")
    return site.raw(address, item["id"], folder)


def submit(site: Cluster, raw: bytes, sender: str = "alice@contoso.com") -> dict:
    response = site.send_raw(sender, raw)
    assert response.status_code == 202, response.text
    return response.json()


def smtp_send(site: Cluster, raw: bytes, rcpts: tuple[str, ...] = ("bob@contoso.com",),
              sender: str = "sender@fabrikam.example", hub: str = "rx-1") -> None:
    host, port = site.smtp(hub, "Internet")
    with smtplib.SMTP(host, port, local_hostname="client.example", timeout=60,
                      source_address=(INTERNET_SOURCE, 0)) as client:
        client.sendmail(sender, list(rcpts), raw)


def headers(*lines: str, sender: str = "alice@contoso.com") -> bytes:
    """A header block with From, To, Date and Message-ID (so the API adds nothing) plus ``lines``."""
    base = [f"From: {sender}", "To: bob@contoso.com", f"Date: {formatdate(localtime=False)}",
            f"Message-ID: <{uuid.uuid4().hex}@hostile.example>"]
    return "".join(f"{line}\r\n" for line in base + list(lines)).encode()


# Each: (name, the bytes after a header block the test adds, extra header lines)
def hostile(tag: str) -> dict[str, bytes]:
    return {
        "duplicate headers": (
            f"Subject: dup {tag}\r\nSubject: second subject {tag}\r\nX-Twice: one\r\nX-Twice: two\r\n"
            "Comments: a\r\nComments: b\r\n\r\nbody\r\n").encode(),
        "broken MIME, no boundary": (
            f"Subject: nobound {tag}\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\n"
            "--x\r\nContent-Type: text/plain\r\n\r\npart\r\n--x--\r\n").encode(),
        "broken MIME, boundary never comes": (
            f'Subject: lostbound {tag}\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="zzz"\r\n\r\n'
            "no such boundary here\r\n--other\r\nContent-Type: text/plain\r\n\r\n\r\n").encode(),
        "broken MIME, nested garbage": (
            f'Subject: nested {tag}\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="a"\r\n\r\n'
            '--a\r\nContent-Type: multipart/alternative; boundary="a"\r\n\r\n--a\r\n--a--\r\n'
            "--a\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n").encode(),
        "8-bit headers and body": (
            f"Subject: 8bit {tag} caf\xe9 \xff\xfe\r\nX-Utf8: \xc3\xa9t\xc3\xa9 \xe2\x82\xac\r\n"
            "Content-Type: text/plain; charset=latin-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            "na\xefve caf\xe9 \x80\x81\xfe\xff and UTF-8 \xc3\xa9\r\n").encode("latin-1"),
        "NUL bytes": (f"Subject: nul {tag}\r\nX-Nul: a\x00b\r\n\r\nbefore\x00after\r\n\x00\r\n").encode(),
        "control characters": (f"Subject: ctl {tag}\x1b[31m\r\n\r\n\x07\x08\x0b\x0c\x1b\x7f\r\n").encode(),
    }


CASES = list(hostile("x"))


@pytest.mark.parametrize("case", CASES)
def test_hostile_messages_submitted_through_the_api_arrive_intact(site: Cluster, case: str) -> None:
    tag = token()
    raw = headers() + hostile(tag)[case]
    submit(site, raw)
    delivered = find(site, "bob@contoso.com", tag)
    assert delivered.endswith(raw), f"{case}: the delivered bytes differ\n{delivered[-600:]!r}"


@pytest.mark.parametrize("case", CASES)
def test_hostile_messages_received_over_smtp_arrive_intact(site: Cluster, case: str) -> None:
    tag = token()
    raw = headers(sender="sender@fabrikam.example") + hostile(tag)[case]
    smtp_send(site, raw)
    delivered = find(site, "bob@contoso.com", tag)
    assert delivered.endswith(raw), f"{case}: the delivered bytes differ\n{delivered[-600:]!r}"


@pytest.mark.parametrize("via", ["api", "smtp"])
def test_a_message_without_a_message_id_gets_exactly_one(site: Cluster, via: str) -> None:
    tag = token()
    sender = "alice@contoso.com" if via == "api" else "sender@fabrikam.example"
    raw = f"From: {sender}\r\nTo: bob@contoso.com\r\nSubject: no id {tag}\r\n\r\nno Message-ID here\r\n".encode()
    if via == "api":
        answer = submit(site, raw)
        assert answer["message_id"].startswith("<") and answer["message_id"].endswith(">")
    else:
        smtp_send(site, raw)
    delivered = find(site, "bob@contoso.com", tag)
    parsed = email.message_from_bytes(delivered, policy=policy.default)
    ids = parsed.get_all("Message-ID")
    assert ids and len(ids) == 1 and ids[0].strip().startswith("<"), ids
    assert delivered.endswith(raw.split(b"\r\n", 1)[1]) or delivered.endswith(raw), delivered[-300:]
    assert parsed.get_content().strip() == "no Message-ID here"


@pytest.mark.parametrize("via", ["api", "smtp"])
def test_a_10_mb_attachment_is_delivered(site: Cluster, via: str) -> None:
    tag = token()
    payload = os.urandom(10 * 1024 * 1024)
    msg = EmailMessage()
    msg["From"] = "alice@contoso.com" if via == "api" else "sender@fabrikam.example"
    msg["To"] = "bob@contoso.com"
    msg["Subject"] = f"big {tag}"
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = f"<{tag}@hostile.example>"
    msg.set_content("the attachment follows")
    msg.add_attachment(payload, maintype="application", subtype="octet-stream", filename="big.bin")
    raw = msg.as_bytes(policy=policy.SMTP)
    assert len(raw) > 13 * 1024 * 1024
    if via == "api":
        submit(site, raw)
    else:
        smtp_send(site, raw)
    delivered = find(site, "bob@contoso.com", tag, timeout=90)
    assert delivered.endswith(raw)
    parsed = email.message_from_bytes(delivered, policy=policy.default)
    (attachment,) = list(parsed.iter_attachments())
    assert attachment.get_filename() == "big.bin" and attachment.get_content() == payload


# region: the size limit, exactly and one byte over


def sized(size: int, tag: str, sender: str) -> bytes:
    """A message of exactly ``size`` bytes (CRLF line ends, no line starting with a dot)."""
    head = headers(f"Subject: size {tag}", sender=sender) + b"\r\n"
    line = b"x" * 76 + b"\r\n"
    count, rest = divmod(size - len(head), len(line))
    body = line * count
    if rest == 1:  # too short for a line of its own: one line a byte longer
        body = body[: -len(line)] + b"x" * 77 + b"\r\n"
    elif rest:
        body += b"y" * (rest - 2) + b"\r\n"
    raw = head + body
    assert len(raw) == size and raw.endswith(b"\r\n"), (len(raw), size)
    return raw


def test_over_smtp_a_message_of_exactly_the_limit_is_delivered(small: Cluster) -> None:
    tag = token()
    raw = sized(SMALL, tag, "sender@fabrikam.example")
    smtp_send(small, raw, hub="rx-small")
    delivered = find(small, "bob@contoso.com", tag)
    assert delivered.endswith(raw)


def test_over_smtp_one_byte_over_the_limit_is_refused_with_552(small: Cluster) -> None:
    tag = token()
    raw = sized(SMALL + 1, tag, "sender@fabrikam.example")
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:  # smtplib announces SIZE=: refused at MAIL
        smtp_send(small, raw, hub="rx-small")
    assert refused.value.smtp_code == 552 and refused.value.smtp_error.startswith(b"5.3.4"), refused.value
    host, port = small.smtp("rx-small", "Internet")
    with smtplib.SMTP(host, port, timeout=30, source_address=(INTERNET_SOURCE, 0)) as client:
        client.ehlo("client.example")
        assert client.docmd(f"MAIL FROM:<s@fabrikam.example> SIZE={SMALL + 1}")[0] == 552
        assert client.docmd("RSET")[0] == 250
        assert client.mail("sender@fabrikam.example")[0] == 250  # no SIZE=: refused at the end of DATA
        assert client.rcpt("bob@contoso.com")[0] == 250
        assert client.data(raw) == (552, b"5.3.4 Message size exceeds fixed maximum message size")
        assert client.noop()[0] == 250, "the session goes on after the refusal"
    assert not [i for i in small.folder("bob@contoso.com") if tag in i["subject"]]


def test_through_the_api_one_byte_over_the_limit_is_413_and_nothing_is_stored(small: Cluster) -> None:
    tag = token()
    response = small.send_raw("alice@contoso.com", sized(SMALL + 1, tag, "alice@contoso.com"))
    assert response.status_code == 413 and "limit" in response.json()["error"], response.text
    assert not [i for i in small.folder("alice@contoso.com", "Outbox") if tag in i["subject"]]


def api_outcome_at_the_limit(small: Cluster) -> str:
    """Submit a message of exactly the limit through the API (202); then it is either delivered
    to bob or bounced to alice with 5.3.4: which one."""
    tag = token()
    submit(small, sized(SMALL, tag, "alice@contoso.com"))

    def outcome() -> str | None:
        if any(tag in i["subject"] for i in small.folder("bob@contoso.com")):
            return "delivered"
        for item in small.folder("alice@contoso.com"):
            if tag in item["subject"] and item["subject"].startswith("Undeliverable"):
                has_status = b"5.3.4" in small.raw("alice@contoso.com", item["id"])
                return "bounced with 5.3.4" if has_status else "bounced without 5.3.4"
        return None
    return wait_until(outcome, timeout=60, message=f"{tag}: neither delivered nor bounced")


def test_through_the_api_a_message_of_exactly_the_limit_is_not_lost(small: Cluster) -> None:
    outcome = api_outcome_at_the_limit(small)
    assert outcome in ("delivered", "bounced with 5.3.4"), f"exactly {SMALL} bytes through the API: {outcome}"


def test_through_the_api_a_message_of_exactly_the_limit_is_delivered(small: Cluster) -> None:
    assert api_outcome_at_the_limit(small) == "delivered"


# endregion


def test_a_message_with_8_bit_headers_to_an_unknown_recipient_is_delivered_and_bounced(site: Cluster) -> None:
    tag = token()
    raw = (f"From: alice@contoso.com\r\nTo: bob@contoso.com, nobody@contoso.com\r\nSubject: 8bit ndr {tag} "
           "caf\xe9\r\n\r\nbody\r\n").encode("latin-1")
    submit(site, raw)
    assert tag.encode() in find(site, "bob@contoso.com", tag), "delivered to the known recipient"
    ndr = find(site, "alice@contoso.com", tag)
    assert b"nobody@contoso.com" in ndr, "the NDR names the unknown recipient"


def test_every_process_is_still_running(site: Cluster, small: Cluster) -> None:
    for cluster in (site, small):
        dead = [p.name for p in cluster.procs.values() if not p.alive]
        assert not dead, f"{dead} died: {cluster.all_logs(40)}"
