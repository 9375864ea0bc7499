"""Delivery outcomes become queue state (mailyard.hub.outcomes), on the in-memory queues:
what each reply does to an item, and how an operator's request on an item in flight is
honoured whatever the delivery's end."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mailyard.errors import TransientDeliveryError
from mailyard.hub.memory_queues import MemoryQueues
from mailyard.hub.outcomes import Batch, Outcome, crashed, defer_batch, settle
from mailyard.hub.queue_actions import ActionReport, Done, await_requests
from mailyard.hub.queues import mapi_queue, submission_queue
from mailyard.hub.records import Item, ItemStatus, PendingAction, Recipient
from mailyard.registry import now_ms
from tests.conftest import make_org
from tests.hub.helpers import StaticHub, message

QUEUE = mapi_queue("Amsterdam", "MBX-AMS-01")
OK = Outcome(250, "2.0.0", "delivered")
LATER = Outcome(451, "4.3.0", "try later")
NO = Outcome(550, "5.1.1", "no such user")


@pytest.fixture
def hub() -> StaticHub:
    return StaticHub(MemoryQueues(), make_org(poison_threshold=2))


def _in_flight(hub: StaticHub, recipients: list[str], *, subject: str = "hello", sender: str = "alice@contoso.com",
               token: str = "t1") -> Batch:
    queues = hub.queues
    now = now_ms()
    msg = message(sender, subject=subject, now=now)
    change = queues.change().add_message(msg, b"Subject: hello\r\n\r\nhi\r\n", refs=1)
    queues.commit([change.enqueue(QUEUE, queues.new_item_ids(1)[0], msg, [Recipient(a) for a in recipients],
                                  now=now)])
    taken = queues.claim(QUEUE.identity, worker=hub.worker, n=10, lease_ms=60_000, cap=0, token=token)
    assert taken is not None and taken.items
    return Batch(QUEUE.identity, QUEUE.next_hop, QUEUE.delivery_type.value, token, taken.items, taken.messages)


def _item(hub: StaticHub, batch: Batch) -> Item | None:
    found = hub.queues.items([batch.items[0].id])
    return found[0] if found else None


def _operator_asks(hub: StaticHub, batch: Batch, pending: PendingAction, *, ndr: bool = True) -> None:
    """An operator's request arrives while the delivery runs (after the worker read the item)."""
    item = batch.items[0]
    change = hub.queues.change().require_status(item, "Active").require_lease(item, item.lease)
    assert hub.queues.commit([change.request(item, pending.value, ndr=ndr)])[0].ok


def _reports(hub: StaticHub) -> list[Item]:
    q = submission_queue("Amsterdam").identity
    return hub.queues.items(hub.queues.members(q))


def test_a_2xx_completes_the_item_and_is_tracked_as_delivered(hub: StaticHub) -> None:
    batch = _in_flight(hub, ["bob@contoso.com"])
    settle(hub, batch, {batch.items[0].id: {"bob@contoso.com": OK}}, remote="MBX-AMS-01")
    assert _item(hub, batch) is None
    assert [(r.event, r.recipients) for r in hub.queues.tracked] == [("DELIVER", ["bob@contoso.com"])]
    assert hub.queues.messages([batch.items[0].msg]) == {}, "the message went with its last item"


def test_a_5xx_fails_that_recipient_with_an_ndr_and_the_others_go_on(hub: StaticHub) -> None:
    batch = _in_flight(hub, ["bob@contoso.com", "nobody@contoso.com"])
    settle(hub, batch, {batch.items[0].id: {"bob@contoso.com": OK, "nobody@contoso.com": NO}})
    assert _item(hub, batch) is None
    (report,) = _reports(hub)
    assert [r.address for r in report.recipients] == ["alice@contoso.com"]
    events = [(r.event, r.recipients) for r in hub.queues.tracked]
    assert ("FAIL", ["nobody@contoso.com"]) in events and ("DSN", ["alice@contoso.com"]) in events


def test_no_ndr_is_sent_to_the_null_sender(hub: StaticHub) -> None:
    batch = _in_flight(hub, ["nobody@contoso.com"], sender="")
    settle(hub, batch, {batch.items[0].id: {"nobody@contoso.com": NO}})
    assert _reports(hub) == []


def test_a_4xx_parks_the_recipient_for_its_own_retry(hub: StaticHub) -> None:
    batch = _in_flight(hub, ["bob@contoso.com", "carol@contoso.com"])
    before = now_ms()
    settle(hub, batch, {batch.items[0].id: {"bob@contoso.com": OK, "carol@contoso.com": LATER}})
    item = _item(hub, batch)
    assert item is not None and item.status == ItemStatus.RETRY
    assert [r.address for r in item.recipients] == ["carol@contoso.com"], "bob was delivered"
    assert item.recipients[0].last_error == "451 4.3.0 try later"
    assert item.next_retry >= before + hub.settings.message_retry_interval * 1000
    assert hub.queues.retry[item.id] == item.next_retry


def test_pending_suspend_then_a_failed_delivery_leaves_the_item_suspended(hub: StaticHub) -> None:
    batch = _in_flight(hub, ["bob@contoso.com"])
    _operator_asks(hub, batch, PendingAction.SUSPEND)
    settle(hub, batch, {batch.items[0].id: {"bob@contoso.com": LATER}})  # batch.items still say pending ""
    item = _item(hub, batch)
    assert item is not None and (item.status, item.pending, item.lease) == ("Suspended", "", "")
    assert item.id not in hub.queues.retry, "a suspended item is not retried"
    assert hub.queues.request_result(item.id) == "Suspended"


def test_pending_suspend_then_a_successful_delivery_says_it_came_too_late(hub: StaticHub) -> None:
    batch = _in_flight(hub, ["bob@contoso.com"])
    _operator_asks(hub, batch, PendingAction.SUSPEND)
    settle(hub, batch, {batch.items[0].id: {"bob@contoso.com": OK}})
    assert _item(hub, batch) is None
    assert hub.queues.request_result(batch.items[0].id) == "delivered: the PendingSuspend came too late"


@pytest.mark.parametrize("ndr", [True, False])
def test_pending_remove_then_a_successful_delivery_delivers_it_and_says_the_remove_came_too_late(
        hub: StaticHub, ndr: bool) -> None:
    batch = _in_flight(hub, ["bob@contoso.com"])
    item_id = batch.items[0].id
    _operator_asks(hub, batch, PendingAction.REMOVE, ndr=ndr)
    settle(hub, batch, {item_id: {"bob@contoso.com": OK}}, remote="MBX-AMS-01")  # batch.items say pending ""
    assert _item(hub, batch) is None and hub.queues.messages([batch.items[0].msg]) == {}
    late = "delivered: the PendingRemove came too late"
    assert hub.queues.request_result(item_id) == late
    # what the operator is shown: `mailyard message remove ID --wait` (and the viewer) answer
    # with what became of the request, not "PendingRemove" nor "Removed"
    report = await_requests(hub, ActionReport([Done(f"{QUEUE.identity}\\{item_id}", "PendingRemove")], []), 5.0)
    assert report.as_dict()["done"] == [{"identity": f"{QUEUE.identity}\\{item_id}", "result": late}]
    # and the tracking log has the delivery, no removal, and the sender got no NDR
    assert [(r.event, r.recipients, r.source) for r in hub.queues.tracked] == [
        ("DELIVER", ["bob@contoso.com"], "STOREDRIVER")]
    assert _reports(hub) == []


def test_pending_remove_then_a_partly_successful_delivery_removes_only_the_rest(hub: StaticHub) -> None:
    batch = _in_flight(hub, ["bob@contoso.com", "carol@contoso.com"])
    _operator_asks(hub, batch, PendingAction.REMOVE)
    settle(hub, batch, {batch.items[0].id: {"bob@contoso.com": OK, "carol@contoso.com": LATER}})
    assert _item(hub, batch) is None
    assert hub.queues.request_result(batch.items[0].id) == "Removed"
    events = [(r.event, r.recipients, r.source) for r in hub.queues.tracked]
    assert ("DELIVER", ["bob@contoso.com"], "STOREDRIVER") in events
    assert ("FAIL", ["carol@contoso.com"], "ADMIN") in events
    (report,) = _reports(hub)
    assert [r.address for r in report.recipients] == ["alice@contoso.com"]
    ndr = hub.queues.bodies([report.msg])[report.msg]
    assert b"carol@contoso.com" in ndr and b"bob@contoso.com" not in ndr, "the NDR is about carol only"


@pytest.mark.parametrize("ndr", [True, False])
def test_pending_remove_then_a_failed_delivery_removes_it(hub: StaticHub, ndr: bool) -> None:
    batch = _in_flight(hub, ["bob@contoso.com"])
    _operator_asks(hub, batch, PendingAction.REMOVE, ndr=ndr)
    settle(hub, batch, {batch.items[0].id: {"bob@contoso.com": LATER}})
    assert _item(hub, batch) is None
    assert len(_reports(hub)) == int(ndr)
    assert hub.queues.request_result(batch.items[0].id) == "Removed" + ("" if ndr else " without NDR")
    assert any(r.event == "FAIL" and r.source == "ADMIN" for r in hub.queues.tracked)


def test_pending_suspend_then_an_unreachable_next_hop_leaves_it_suspended(hub: StaticHub) -> None:
    batch = _in_flight(hub, ["bob@contoso.com"])
    _operator_asks(hub, batch, PendingAction.SUSPEND)
    defer_batch(hub, batch, TransientDeliveryError(451, "4.4.0", "connection refused"))
    item = _item(hub, batch)
    assert item is not None and item.status == ItemStatus.SUSPENDED
    assert item.id not in hub.queues.queue_map[QUEUE.identity].ready, "not put back on the ready list"


def test_an_unreachable_next_hop_puts_the_batch_back_in_order_and_the_queue_into_retry(hub: StaticHub) -> None:
    first = _in_flight(hub, ["bob@contoso.com"], subject="a", token="x")
    second = _in_flight(hub, ["bob@contoso.com"], subject="b", token="x")
    batch = Batch(QUEUE.identity, QUEUE.next_hop, QUEUE.delivery_type.value, "x",
                  first.items + second.items, {**first.messages, **second.messages})
    defer_batch(hub, batch, TransientDeliveryError(451, "4.4.0", "connection refused"))
    assert hub.queues.queue_map[QUEUE.identity].ready == [first.items[0].id, second.items[0].id]
    (info,) = hub.queues.queues([QUEUE.identity])
    assert (info.status, info.failures) == ("Retry", 1)
    assert info.last_error == "451 4.4.0 connection refused"


def test_a_stage_that_keeps_crashing_on_an_item_sends_it_to_poison(hub: StaticHub) -> None:
    batch = _in_flight(hub, ["bob@contoso.com"])
    crashed(hub, batch.items, batch.token, "RuntimeError: boom")
    item = _item(hub, batch)
    assert item is not None and (item.status, item.crashes) == ("Ready", 1)
    again = hub.queues.claim(QUEUE.identity, worker=hub.worker, n=1, lease_ms=60_000, cap=0, token="t2")
    assert again is not None
    crashed(hub, again.items, "t2", "RuntimeError: boom")
    item = _item(hub, batch)
    assert item is not None and (item.queue, item.status) == ("Amsterdam\\Poison", "Suspended")
    assert hub.queues.tracked[-1].event == "POISONMESSAGE"


def test_a_worker_that_lost_its_lease_changes_nothing(hub: StaticHub) -> None:
    batch = _in_flight(hub, ["bob@contoso.com"])
    hub.queues.expire_leases()
    (expired,) = hub.queues.expired_leases(now_ms(), 10)
    hub.queues.commit([hub.queues.change().require_lease(expired, expired.lease)
                       .put_back(expired, status="Ready", last_error="lease expired")])
    settle(hub, batch, {batch.items[0].id: {"bob@contoso.com": OK}})
    item = _item(hub, batch)
    assert item is not None and item.status == "Ready", "the late outcome was not applied"


def test_a_message_that_expired_during_its_delivery_gets_an_ndr(hub: StaticHub) -> None:
    batch = _in_flight(hub, ["bob@contoso.com"])
    msg = batch.messages[batch.items[0].msg]
    expired = {msg.id: replace(msg, expires=now_ms() - 1)}
    settle(hub, replace(batch, messages=expired), {batch.items[0].id: {"bob@contoso.com": LATER}})
    assert _item(hub, batch) is None
    (report,) = _reports(hub)
    assert [r.address for r in report.recipients] == ["alice@contoso.com"]
    fail = next(r for r in hub.queues.tracked if r.event == "FAIL")
    assert "4.4.7" in fail.recipient_status[0]


def test_a_pending_remove_wins_over_an_expiry_in_the_same_outcome(hub: StaticHub) -> None:
    batch = _in_flight(hub, ["bob@contoso.com"])
    _operator_asks(hub, batch, PendingAction.REMOVE, ndr=False)
    msg = batch.messages[batch.items[0].msg]
    settle(hub, replace(batch, messages={msg.id: replace(msg, expires=now_ms() - 1)}),
           {batch.items[0].id: {"bob@contoso.com": LATER}})
    assert _item(hub, batch) is None and _reports(hub) == [], "removed silently, as asked"
    assert hub.queues.request_result(batch.items[0].id) == "Removed without NDR"


def test_pending_remove_then_an_unreachable_next_hop_removes_it(hub: StaticHub) -> None:
    batch = _in_flight(hub, ["bob@contoso.com"])
    _operator_asks(hub, batch, PendingAction.REMOVE)
    defer_batch(hub, batch, TransientDeliveryError(451, "4.4.0", "connection refused"))
    assert _item(hub, batch) is None and len(_reports(hub)) == 1


def test_a_new_request_forgets_what_became_of_an_earlier_one(hub: StaticHub) -> None:
    batch = _in_flight(hub, ["bob@contoso.com"])
    _operator_asks(hub, batch, PendingAction.SUSPEND)
    settle(hub, batch, {batch.items[0].id: {"bob@contoso.com": LATER}})
    assert hub.queues.request_result(batch.items[0].id) == "Suspended"
    (held,) = hub.queues.items([batch.items[0].id])
    hub.queues.commit([hub.queues.change().require_status(held, "Suspended").resume(held)])
    again = hub.queues.claim(QUEUE.identity, worker=hub.worker, n=1, lease_ms=60_000, cap=0, token="t2")
    assert again is not None
    item = again.items[0]
    hub.queues.commit([hub.queues.change().require_status(item, "Active").require_lease(item, "t2")
                       .request(item, PendingAction.REMOVE.value)])
    assert hub.queues.request_result(item.id) is None, "no stale answer for the new request"


def test_after_a_batch_crash_an_item_with_a_request_is_not_tried_again(hub: StaticHub) -> None:
    from mailyard.hub.runner import Stage, _run_stage

    first = _in_flight(hub, ["bob@contoso.com"], subject="a", token="x")
    second = _in_flight(hub, ["bob@contoso.com"], subject="b", token="x")
    batch = Batch(QUEUE.identity, QUEUE.next_hop, QUEUE.delivery_type.value, "x",
                  first.items + second.items, {**first.messages, **second.messages})
    attempts: list[list[str]] = []

    def flaky(_hub, b: Batch) -> None:
        attempts.append([i.id for i in b.items])
        if len(b.items) > 1:
            _operator_asks(hub, first, PendingAction.SUSPEND)  # while the batch was being delivered
            raise RuntimeError("the stage broke on the batch")
        settle(hub, b, {i.id: {"bob@contoso.com": OK} for i in b.items})

    _run_stage(hub, Stage("test", flaky, lambda s: 0), batch)  # type: ignore[arg-type]
    assert attempts == [[first.items[0].id, second.items[0].id], [second.items[0].id]]
    item = _item(hub, first)
    assert item is not None and item.status == "Suspended" and item.crashes == 0
    assert _item(hub, second) is None, "its neighbour was delivered"


def test_a_delivery_that_works_takes_the_queue_out_of_retry_in_the_same_step(hub: StaticHub) -> None:
    batch = _in_flight(hub, ["bob@contoso.com"])
    defer_batch(hub, batch, TransientDeliveryError(451, "4.4.0", "connection refused"))
    hub.queues.commit([hub.queues.change().set_queue(QUEUE.identity, next_retry=0)])  # Retry-Queue
    again = hub.queues.claim(QUEUE.identity, worker=hub.worker, n=1, lease_ms=60_000, cap=0, token="t2")
    assert again is not None
    retried = Batch(QUEUE.identity, QUEUE.next_hop, QUEUE.delivery_type.value, "t2", again.items, again.messages)
    settle(hub, retried, {again.items[0].id: {"bob@contoso.com": OK}})
    (info,) = hub.queues.queues([QUEUE.identity])
    assert (info.failures, info.last_error, info.next_retry) == (0, "", 0), "out of Retry, its error cleared"
