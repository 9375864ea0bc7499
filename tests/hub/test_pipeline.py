"""Mail between mailboxes through the whole pipeline: Outbox, round robin, store driver,
categorizer, MapiDelivery, Inbox (and Sent Items). Real Redis, processes and HTTP."""

from __future__ import annotations

import email
import uuid
from email import policy
from email.message import Message

import pytest

from mailyard.org import Organization
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from tests.conftest import ROOT, make_org


def with_loop_groups(org: Organization) -> Organization:
    data = org.model_dump(mode="json")
    data["groups"] += [
        {"address": "loop-a@contoso.com", "members": ["loop-b@contoso.com", "bob@contoso.com"]},
        {"address": "loop-b@contoso.com", "members": ["loop-a@contoso.com", "bob@contoso.com",
                                                      "carol@contoso.com"]},
    ]
    return Organization.model_validate(data)


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory):
    cluster = Cluster(redis_server.new_db(), tmp_path_factory.mktemp("pipeline"),
                      with_loop_groups(make_org()), cwd=ROOT)
    try:
        cluster.start_mailboxes()
        cluster.start_hub("Amsterdam", "ams-1", wait=False)
        cluster.start_hub("London", "lon-1", wait=False)
        for name in ("ams-1", "lon-1"):
            cluster.wait_hub(cluster.procs[name])
        yield cluster
    finally:
        cluster.close()


def subject(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:8]}"


def parsed(site: Cluster, address: str, item: dict) -> Message:
    return email.message_from_bytes(site.raw(address, item["id"]), policy=policy.default)


def test_mail_to_a_mailbox_on_the_same_server_arrives_once_with_a_trace(site: Cluster) -> None:
    s = subject("same server")
    site.send("alice@contoso.com", ["bob@contoso.com"], subject=s, body="Hi Bob")
    (item,) = site.wait_for_subject("bob@contoso.com", s)
    msg = parsed(site, "bob@contoso.com", item)
    received = msg.get_all("Received")
    assert len(received) >= 2, f"expected the hub's and the mailbox server's Received, got {received}"
    assert any("Mailyard hub" in r and "ams-1" in r for r in received), received
    assert any("MBX-AMS-01" in r for r in received), received
    assert msg.get_content().strip() == "Hi Bob"
    # the original is in the sender's Sent Items, and the Outbox is empty again
    site.wait_for_subject("alice@contoso.com", s, folder="Sent Items")
    assert s not in site.subjects("alice@contoso.com", "Outbox")
    assert site.subjects("bob@contoso.com").count(s) == 1


def test_mail_to_another_server_of_the_site_arrives_once(site: Cluster) -> None:
    s = subject("other server")
    site.send("alice@contoso.com", ["dave@contoso.com"], subject=s)
    site.wait_for_subject("dave@contoso.com", s)
    # readable by any Maildir tool: the standard library finds it on disk
    on_disk = [m for m in site.maildir("dave@contoso.com") if m["Subject"] == s]
    assert len(on_disk) == 1


def test_an_alias_resolves_to_its_mailbox(site: Cluster) -> None:
    s = subject("alias")
    site.send("bob@contoso.com", ["c.claes@contoso.com"], cc=["carol@contoso.com"], subject=s)
    site.wait_for_subject("carol@contoso.com", s)
    assert site.subjects("carol@contoso.com").count(s) == 1, "alias and primary must give one copy"


def test_a_nested_group_reaches_each_member_once(site: Cluster) -> None:
    # all-staff contains amsterdam-team (alice, bob, carol, dave) and alice again, erin, frank
    s = subject("nested group")
    site.send("dave@contoso.com", ["all-staff@contoso.com"], cc=["amsterdam-team@contoso.com"], subject=s)
    for member in ("alice", "bob", "carol", "dave"):
        site.wait_for_subject(f"{member}@contoso.com", s)
    for member in ("alice", "bob", "carol", "dave"):
        assert site.subjects(f"{member}@contoso.com").count(s) == 1, member
    # erin and frank are in London: their copy is relayed there and delivered once too
    for member in ("erin", "frank"):
        site.wait_for_subject(f"{member}@contoso.com", s)
        assert site.subjects(f"{member}@contoso.com").count(s) == 1, member


def test_group_loops_end_and_deliver_once(site: Cluster) -> None:
    s = subject("loop")
    site.send("alice@contoso.com", ["loop-a@contoso.com"], subject=s)
    site.wait_for_subject("bob@contoso.com", s)
    site.wait_for_subject("carol@contoso.com", s)
    assert site.subjects("bob@contoso.com").count(s) == 1
    assert site.subjects("carol@contoso.com").count(s) == 1


def test_bcc_recipients_get_the_message_without_the_bcc_header(site: Cluster) -> None:
    s = subject("bcc")
    site.send("alice@contoso.com", ["bob@contoso.com"], bcc=["dave@contoso.com"], subject=s)
    (to_bob,) = site.wait_for_subject("bob@contoso.com", s)
    (to_dave,) = site.wait_for_subject("dave@contoso.com", s)
    assert parsed(site, "bob@contoso.com", to_bob)["Bcc"] is None
    assert parsed(site, "dave@contoso.com", to_dave)["Bcc"] is None
    # the sender's own copy in Sent Items keeps it, as a mail client shows it
    (sent,) = site.wait_for_subject("alice@contoso.com", s, folder="Sent Items")
    raw = site.raw("alice@contoso.com", sent["id"], folder="Sent Items")
    assert b"Bcc: dave@contoso.com" in raw


def test_an_unknown_recipient_gets_an_rfc3464_ndr_and_the_others_the_message(site: Cluster) -> None:
    s = subject("unknown")
    site.send("bob@contoso.com", ["nobody@contoso.com", "carol@contoso.com"], subject=s)
    site.wait_for_subject("carol@contoso.com", s)
    (ndr_item,) = site.wait_for_subject("bob@contoso.com", f"Undeliverable: {s}")
    ndr = parsed(site, "bob@contoso.com", ndr_item)
    assert ndr.get_content_type() == "multipart/report"
    assert ndr.get_param("report-type") == "delivery-status"
    status_parts = [p for p in ndr.walk() if p.get_content_type() == "message/delivery-status"]
    assert len(status_parts) == 1
    blocks = status_parts[0].get_payload()
    per_recipient = [b for b in blocks if b.get("Final-Recipient")]
    assert [b["Final-Recipient"] for b in per_recipient] == ["rfc822; nobody@contoso.com"]
    assert per_recipient[0]["Status"] == "5.1.1"
    assert per_recipient[0]["Action"] == "failed"
    assert "RESOLVER.ADR.RecipNotFound" in per_recipient[0]["Diagnostic-Code"]
    # the original headers come back, so the sender can tell which message failed
    headers_part = [p for p in ndr.walk() if p.get_content_type() == "text/rfc822-headers"]
    assert headers_part and s in headers_part[0].get_payload(decode=True).decode()


def test_each_failure_gives_exactly_one_ndr(site: Cluster) -> None:
    # The NDR itself comes from <> and is delivered like mail; it is made once, not per retry.
    from mailyard import tracking

    s = subject("null sender")
    site.send("frank@contoso.com", ["ghost@contoso.com"], subject=s)
    site.wait_for_subject("frank@contoso.com", f"Undeliverable: {s}")
    dsns = [r for r in tracking.search(site.r, event="DSN") if s in r.subject]
    assert len(dsns) == 1, dsns
