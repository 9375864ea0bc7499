"""A mailbox server that is down: its queue waits in Retry with the last error, and mail is
delivered when it returns; mail that cannot make it in time gets a delay DSN, then an NDR."""

from __future__ import annotations

import email
from email import policy

from mailyard.hub.queue_rows import queue_messages
from mailyard.hub.redis_queues import RedisQueues
from mailyard.testing.waiting import wait_until
from tests.conftest import make_org


def queue(site, identity: str):
    found = [q for q in RedisQueues.reader(site.r).queues() if q.identity == identity]
    return found[0] if found else None


def test_mail_for_a_server_that_is_down_waits_in_retry_and_goes_when_it_is_back(cluster_factory) -> None:
    # Given MBX-AMS-02 is down (it registered once, then died)
    site = cluster_factory(make_org(queue_glitch_retry_interval=1))
    site.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
    site.start_hub("Amsterdam", "retry-1")
    site.kill("MBX-AMS-02")

    # When mail is sent to a mailbox on it
    site.send("alice@contoso.com", ["carol@contoso.com"], subject="while you were down")

    # Then its queue is in Retry with the last error and a next retry time, the message in it
    def in_retry():
        q = queue(site, "Amsterdam\\MBX-AMS-02")
        return q if q and q.status == "Retry" and q.message_count == 1 else None

    q = wait_until(in_retry, timeout=30, message=lambda: [x.as_dict() for x in RedisQueues.reader(site.r).queues()])
    assert "MBX-AMS-02" in q.last_error and q.last_error.startswith("451 4.4."), q.last_error
    assert q.next_retry > 0
    (msg,) = queue_messages(site.r, "Amsterdam\\MBX-AMS-02")
    assert msg["status"] == "Retry" and msg["retry_count"] >= 1 and msg["last_error"], msg

    # When the server comes back, the message is delivered
    site.start_mailbox("MBX-AMS-02")
    site.wait_for_subject("carol@contoso.com", "while you were down")
    wait_until(lambda: queue(site, "Amsterdam\\MBX-AMS-02").message_count == 0, timeout=30)
    after = queue(site, "Amsterdam\\MBX-AMS-02")
    assert after.status in ("Ready", "Active") and after.last_error == "", after.as_dict()


def test_mail_that_cannot_be_delivered_in_time_gets_a_delay_dsn_then_a_447_ndr(cluster_factory) -> None:
    # Given short expiry and delay-notification times, and a mailbox server that stays down
    site = cluster_factory(make_org(message_expiration_timeout=6, delay_notification_timeout=2))
    site.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
    site.start_hub("Amsterdam", "expire-1")
    site.kill("MBX-AMS-02")

    site.send("bob@contoso.com", ["dave@contoso.com"], subject="doomed")

    # Then the sender first gets one delay DSN, then the NDR with 4.4.7
    (ndr_item,) = site.wait_for_subject("bob@contoso.com", "Undeliverable: doomed", timeout=60)
    subjects = site.subjects("bob@contoso.com")
    assert subjects.count("Delivery delayed: doomed") == 1, subjects
    items = {i["subject"]: i for i in site.folder("bob@contoso.com")}
    assert items["Delivery delayed: doomed"]["date"] <= items["Undeliverable: doomed"]["date"]

    def report(subject: str):
        raw = site.raw("bob@contoso.com", items[subject]["id"])
        msg = email.message_from_bytes(raw, policy=policy.default)
        (part,) = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
        return [b for b in part.get_payload() if b.get("Final-Recipient")]

    (delayed,) = report("Delivery delayed: doomed")
    assert delayed["Action"] == "delayed" and delayed["Status"] == "4.4.7"
    (failed,) = report("Undeliverable: doomed")
    assert failed["Action"] == "failed" and failed["Status"] == "4.4.7"
    assert failed["Final-Recipient"] == "rfc822; dave@contoso.com"
    assert "QUEUE.Expired" in failed["Diagnostic-Code"]
    # and the message is gone from the queue
    assert queue(site, "Amsterdam\\MBX-AMS-02").message_count == 0
