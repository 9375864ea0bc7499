"""The operator's actions (mailyard.hub.queue_actions) on the in-memory queues: what each does
to a queue or a message in each state, and that a late action never brings a message back."""

from __future__ import annotations

import pytest

from mailyard.errors import NotFoundError, StateError
from mailyard.hub import queue_actions as actions
from mailyard.hub.memory_queues import MemoryQueues
from mailyard.hub.outcomes import Batch, Outcome, settle
from mailyard.hub.queues import mapi_queue, submission_queue
from mailyard.hub.records import Item, Recipient
from mailyard.registry import now_ms
from tests.conftest import make_org
from tests.hub.helpers import StaticHub, message

QUEUE = mapi_queue("Amsterdam", "MBX-AMS-01")


@pytest.fixture
def hub() -> StaticHub:
    return StaticHub(MemoryQueues(), make_org())


def _queued(hub: StaticHub, spec=QUEUE) -> Item:
    q = hub.queues
    now = now_ms()
    msg = message(now=now)
    q.commit([q.change().add_message(msg, b"Subject: hello\r\n\r\nhi\r\n", refs=1)
              .enqueue(spec, q.new_item_ids(1)[0], msg, [Recipient("bob@contoso.com")], now=now)])
    return q.items(q.members(spec.identity))[-1]


def _claimed(hub: StaticHub) -> tuple[Item, Batch]:
    taken = hub.queues.claim(QUEUE.identity, worker=hub.worker, n=1, lease_ms=60_000, cap=0, token="t")
    assert taken is not None
    return taken.items[0], Batch(QUEUE.identity, QUEUE.next_hop, QUEUE.delivery_type.value, "t", taken.items,
                                 taken.messages)


def test_suspend_a_ready_message_then_resume_it(hub: StaticHub) -> None:
    item = _queued(hub)
    assert actions.suspend_message(hub, item).result == "Suspended"
    assert hub.queues.items([item.id])[0].status == "Suspended"
    held = actions.find_item(hub, item.identity)
    assert actions.resume_message(hub, held).result == "Ready"


def test_a_message_being_delivered_is_marked_pending(hub: StaticHub) -> None:
    _queued(hub)
    item, _ = _claimed(hub)
    assert actions.suspend_message(hub, item).result == "PendingSuspend"
    assert actions.remove_message(hub, actions.find_item(hub, item.id)).result == "PendingRemove"
    assert actions.resume_message(hub, actions.find_item(hub, item.id)).result == "Active"
    assert hub.queues.items([item.id])[0].pending == ""


def test_an_action_read_before_a_delivery_ended_does_not_bring_the_message_back(hub: StaticHub) -> None:
    _queued(hub)
    stale, batch = _claimed(hub)  # the operator read the item while it was being delivered
    settle(hub, batch, {stale.id: {"bob@contoso.com": Outcome(250, "2.0.0", "ok")}})
    for act in (actions.suspend_message, actions.remove_message):
        with pytest.raises(NotFoundError, match="left its queue"):
            act(hub, stale)
    assert hub.queues.items([stale.id]) == [], "nothing was re-created"


def test_remove_does_not_fail_recipients_delivered_since_it_was_read(hub: StaticHub) -> None:
    item = _queued(hub)
    hub.queues.commit([hub.queues.change().require_status(item, "Ready").suspend(item)])
    stale = hub.queues.items([item.id])[0]  # read as Suspended with bob
    fresh = actions.find_item(hub, item.id)
    actions.resume_message(hub, fresh)
    claimed, batch = _claimed(hub)
    settle(hub, batch, {claimed.id: {"bob@contoso.com": Outcome(451, "4.3.0", "later")}})
    hub.queues.commit([hub.queues.change().require_status(hub.queues.items([item.id])[0], "Retry")
                       .suspend(hub.queues.items([item.id])[0])])
    # The same status as read (Suspended), but it has been through a delivery attempt since.
    done = actions.remove_message(hub, stale)
    assert done.result == "Removed"
    fail = [r for r in hub.queues.tracked if r.event == "FAIL"][-1]
    assert fail.recipients == ["bob@contoso.com"]


def test_submission_and_poison_messages_cannot_be_suspended(hub: StaticHub) -> None:
    item = _queued(hub, submission_queue("Amsterdam"))
    with pytest.raises(StateError, match="cannot be suspended"):
        actions.suspend_message(hub, item)


def test_the_poison_queue_cannot_be_suspended_or_resumed(hub: StaticHub) -> None:
    _queued(hub)
    item, _ = _claimed(hub)
    hub.queues.commit([hub.queues.change().require_lease(item, "t").to_poison(item, crashes=2, reason="x",
                                                                             now=now_ms())])
    for act in (actions.suspend_queue, actions.resume_queue):
        with pytest.raises(StateError, match="Poison"):
            act(hub, "Amsterdam\\Poison")
    released = actions.resume_message(hub, actions.find_item(hub, item.id))
    assert released.result == "Resubmitted"
    (back,) = hub.queues.items([item.id])
    assert (back.queue, back.crashes, back.status) == ("Amsterdam\\Submission", 0, "Ready")
    assert item.id in hub.queues.expiry, "a message out of Poison expires again"


def test_retry_queue_needs_resubmit_for_unreachable(hub: StaticHub) -> None:
    from mailyard.hub.queues import unreachable_queue
    _queued(hub, unreachable_queue("Amsterdam"))
    with pytest.raises(StateError, match="--resubmit"):
        actions.retry_queue(hub, "Amsterdam\\Unreachable")
    assert actions.retry_queue(hub, "Amsterdam\\Unreachable", resubmit_all=True).result == "Resubmitted 1"
    assert len(hub.queues.members("Amsterdam\\Submission")) == 1


def test_a_message_is_resubmitted_once_however_many_operators_ask(hub: StaticHub) -> None:
    from mailyard.hub.queues import unreachable_queue
    _queued(hub, unreachable_queue("Amsterdam"))
    item = hub.queues.items(hub.queues.members("Amsterdam\\Unreachable"))[0]
    target = submission_queue("Amsterdam")
    twice = [hub.queues.change().require_state(item).move(item, target, now=now_ms()) for _ in range(2)]
    results = hub.queues.commit(twice)
    assert [r.ok for r in results] == [True, False]
    assert hub.queues.queue_map[target.identity].ready == [item.id]
