"""The sweeper (mailyard.hub.sweeper), one pass at a time, against a real Redis and no
running hub: what each of its duties does to queued mail."""

from __future__ import annotations

import json
import os

import pytest

from mailyard import registry
from mailyard.broker import make_app
from mailyard.hub.intake import accept
from mailyard.hub.node import Node
from mailyard.hub.queues import mapi_queue, submission_queue
from mailyard.hub.records import Item, Recipient
from mailyard.hub.sweeper import Sweeper, worker_crashed, worker_pids
from mailyard.orgstore import apply_org
from mailyard.processes import process_state
from mailyard.testing.waiting import wait_until
from mailyard.tracking import search
from tests.conftest import make_org
from tests.hub.helpers import message, record

SUB = submission_queue("Amsterdam")
MBX = mapi_queue("Amsterdam", "MBX-AMS-01")


@pytest.fixture
def node(redis_url: str) -> Node:
    hub = Node(name="sweep-1", site="Amsterdam", redis_url=redis_url, app=make_app(redis_url))
    apply_org(hub.r, make_org(poison_threshold=2, delay_notification_timeout=1))
    return hub


def _queued(node: Node, *, expires_in_ms: int = 86_400_000, sender: str = "alice@contoso.com") -> Item:
    """A message waiting in MBX-AMS-01's queue, as the categorizer leaves it."""
    q = node.queues
    now = registry.now_ms()
    msg = message(sender, now=now, expires_in_ms=expires_in_ms)
    change = q.change().add_message(msg, b"Subject: hello\r\n\r\nhi\r\n", refs=1,
                                    delay_report_at=now - 1)
    q.commit([change.enqueue(MBX, q.new_item_ids(1)[0], msg, [Recipient("bob@contoso.com")], now=now)])
    (item,) = q.items(q.members(MBX.identity))[-1:]
    return item


def _claim(node: Node, lease_ms: int = 60_000) -> Item:
    taken = node.queues.claim(MBX.identity, worker=node.worker, n=1, lease_ms=lease_ms, cap=0, token="tok")
    assert taken is not None and taken.items
    return taken.items[0]


def _heartbeat(node: Node, *, started: int, pids: list[int]) -> None:
    registry.hub_heartbeat(node.r, node.name, node.site, started=started, extra={"pids": json.dumps(pids)})


def test_a_worker_that_died_counts_as_a_crash_a_stalled_one_does_not() -> None:
    item = Item("1", "m", MBX.identity, hub="h", leased=1000, pid=42)
    now = 10_000
    restarted = registry.HubInfo("h", "Amsterdam", started=2000, heartbeat=now)
    assert worker_crashed(item, restarted, 3, now)[0] is True
    child_gone = registry.HubInfo("h", "Amsterdam", started=500, heartbeat=now, pids=[1, 2])
    assert worker_crashed(item, child_gone, 3, now)[0] is True
    silent = registry.HubInfo("h", "Amsterdam", started=500, heartbeat=now - 60_000, pids=[1, 2])
    assert worker_crashed(item, silent, 3, now)[0] is False, "cut off from Redis, maybe alive"
    assert worker_crashed(item, None, 3, now)[0] is False


def test_a_pool_child_killed_but_not_yet_reaped_is_no_longer_listed_as_a_worker() -> None:
    # (the pool reaps a killed child seconds later under load; a crash in between must count)
    child = os.fork()
    if child == 0:
        os._exit(0)
    try:
        wait_until(lambda: process_state(child) == "Z", timeout=30, message="the child did not exit")
        assert os.getpid() in worker_pids()
        assert child not in worker_pids(), "a zombie is listed as a living worker"
    finally:
        os.waitpid(child, 0)


def test_an_expired_lease_goes_back_to_its_queue_and_a_drain_is_queued(node: Node) -> None:
    _queued(node)
    item = _claim(node, lease_ms=-1)
    _heartbeat(node, started=item.leased - 1000, pids=[item.pid])  # alive, same process: a stall
    node.r.delete(f"my:kick:{MBX.identity}")
    done = Sweeper(node).sweep()
    assert done.get("reclaimed") == 1, done
    (back,) = node.queues.items([item.id])
    assert (back.status, back.lease, back.crashes) == ("Ready", "", 0)
    assert node.r.exists(f"my:kick:{MBX.identity}"), "a drain was queued for the queue"


def test_a_worker_that_crashed_twice_on_an_item_sends_it_to_poison(node: Node) -> None:
    _queued(node)
    for _ in range(2):
        item = _claim(node, lease_ms=-1)
        _heartbeat(node, started=item.leased + 1, pids=[1])  # the hub restarted since it took the item
        Sweeper(node).reclaim_expired_leases()
    (held,) = node.queues.items([item.id])
    assert (held.queue, held.status, held.crashes) == ("Amsterdam\\Poison", "Suspended", 2)
    assert [r.event for r in search(node.r, event="POISONMESSAGE")] == ["POISONMESSAGE"]


def test_a_pending_suspend_on_an_item_whose_worker_died_leaves_it_suspended(node: Node) -> None:
    _queued(node)
    item = _claim(node, lease_ms=-1)
    ask = node.queues.change().require_status(item, "Active").require_lease(item, item.lease)
    node.queues.commit([ask.request(item, "PendingSuspend")])
    _heartbeat(node, started=item.leased + 1, pids=[1])
    Sweeper(node).reclaim_expired_leases()
    (held,) = node.queues.items([item.id])
    assert (held.status, held.queue) == ("Suspended", MBX.identity)
    assert node.queues.request_result(item.id) == "Suspended"


def test_an_expired_message_leaves_with_an_ndr_to_its_sender(node: Node) -> None:
    item = _queued(node, expires_in_ms=-1)
    assert Sweeper(node).expire() == 1
    assert node.queues.items([item.id]) == []
    (report,) = node.queues.items(node.queues.members(SUB.identity))
    assert [r.address for r in report.recipients] == ["alice@contoso.com"]
    (fail,) = search(node.r, event="FAIL")
    assert "4.4.7" in fail.recipient_status[0]


def test_a_message_in_flight_does_not_expire_under_its_worker(node: Node) -> None:
    _queued(node, expires_in_ms=-1)
    _claim(node)
    assert Sweeper(node).expire() == 0


def test_one_delay_notification_per_message(node: Node) -> None:
    _queued(node)
    sweeper = Sweeper(node)
    assert sweeper.delay_notifications() == 1
    assert sweeper.delay_notifications() == 0
    (report,) = node.queues.items(node.queues.members(SUB.identity))
    msg = node.queues.messages([report.msg])[report.msg]
    assert (msg.dsn, msg.subject) == ("delay", "Delivery delayed: hello")


def test_a_due_retry_is_promoted_and_its_queue_kicked(node: Node) -> None:
    _queued(node)
    item = _claim(node)
    node.queues.commit([node.queues.change().require_lease(item, "tok").park(
        item, item.recipients, until=registry.now_ms() - 1, last_error="451 4.3.0 later")])
    node.r.delete(f"my:kick:{MBX.identity}")
    assert Sweeper(node).promote_due_retries() == 1
    (ready,) = node.queues.items([item.id])
    assert ready.status == "Ready" and node.r.exists(f"my:kick:{MBX.identity}")


def test_a_queue_whose_drain_was_lost_is_kicked_again(node: Node) -> None:
    _queued(node)
    node.r.delete(f"my:kick:{MBX.identity}")  # the Celery message was lost
    sweeper = Sweeper(node)
    assert sweeper.kick_stalled_queues() == 1
    assert sweeper.kick_stalled_queues() == 0, "its drain is pending now"


def test_mail_accepted_twice_from_one_origin_is_stored_once(node: Node) -> None:
    q = node.queues
    now = registry.now_ms()
    results = []
    for _ in range(2):
        msg = message(now=now)
        results.append(q.commit([accept(q.change(), msg, b"x", ["bob@contoso.com"], item_id=q.new_item_ids(1)[0],
                                        settings=node.settings, now=now, dedup="MBX-AMS-01/alice@contoso.com/9",
                                        record=record(msg))])[0])
    assert results[0].ok and (results[1].failed, results[1].value) == ("first", q.known("MBX-AMS-01/alice@contoso.com/9"))


def test_a_delay_dsn_that_comes_due_during_categorization_is_not_forgotten(node: Node) -> None:
    q = node.queues
    now = registry.now_ms()
    msg = message(now=now)
    change = q.change().add_message(msg, b"Subject: hello\r\n\r\nhi\r\n", refs=1, delay_report_at=now - 1)
    q.commit([change.enqueue(SUB, q.new_item_ids(1)[0], msg, [Recipient("bob@contoso.com")], now=now)])
    assert Sweeper(node).delay_notifications() == 0, "nothing to report while it is categorized"
    assert node.r.zscore("my:delay", msg.id) is not None, "still scheduled"
