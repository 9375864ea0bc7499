"""A message that crashes its worker again and again goes to the Poison queue (after
``poison_threshold`` crashes, counted with the leases in Redis) instead of taking the hubs
down forever; it never expires there, and an operator releases it with resume."""

from __future__ import annotations

from mailyard import tracking
from mailyard.hub.queue_actions import act_on_messages, admin_node
from mailyard.hub.queue_rows import message_rows, queue_rows
from mailyard.testing.waiting import wait_until
from tests.conftest import make_org


def test_a_message_that_kills_its_worker_twice_is_set_aside_and_released_on_resume(cluster_factory) -> None:
    site = cluster_factory(make_org(lease_time=3, message_expiration_timeout=600))
    site.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
    site.start_hub("Amsterdam", "victim", faults="categorize.pill=child", concurrency=1)

    site.send("alice@contoso.com", ["carol@contoso.com"], subject="POISON-PILL")
    site.send("alice@contoso.com", ["carol@contoso.com"], subject="healthy")

    def poisoned() -> list[dict]:
        return [m for m in message_rows(site.r, queues=["Amsterdam\\Poison"]) if m["subject"] == "POISON-PILL"]

    (msg,) = wait_until(poisoned, timeout=90, message=lambda: queue_rows(site.r))
    assert msg["status"] == "Suspended" and msg["expiration_time"] is None
    assert "poison" in msg["last_error"]
    site.wait_for_subject("carol@contoso.com", "healthy")  # the rest of the mail flows
    assert site.procs["victim"].alive, "the hub survives: only pool children died"
    poison = next(q for q in queue_rows(site.r) if q["identity"] == "Amsterdam\\Poison")
    assert poison["message_count"] == 1
    assert [r.event for r in tracking.search(site.r, event="POISONMESSAGE") if r.internal_id]

    # Poison messages cannot be suspended; an operator resumes it once the cause is fixed
    node = admin_node(site.redis_url)
    refused = act_on_messages(node, "suspend", [msg["identity"]])
    assert refused.failed and "cannot be suspended" in refused.failed[0][1]
    site.kill("victim")
    site.start_hub("Amsterdam", "fixed")
    done = act_on_messages(node, "resume", [msg["identity"]])
    assert [d.result for d in done.done] == ["Resubmitted"]
    site.wait_for_subject("carol@contoso.com", "POISON-PILL")
