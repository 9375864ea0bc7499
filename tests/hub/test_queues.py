"""The mail queue contract (mailyard.hub.queues), one behaviour suite for both of its
implementations: Redis (what hubs run) and memory (what the stages' unit tests run on)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from mailyard.broker import DrainMessages, make_app
from mailyard.hub.intake import accept
from mailyard.hub.memory_queues import MemoryQueues
from mailyard.hub.queues import MailQueues, QueueStatus, Worker, mapi_queue, submission_queue
from mailyard.hub.records import ItemStatus, PendingAction, QueueKind, Recipient
from mailyard.hub.redis_queues import RedisQueues
from mailyard.registry import now_ms
from tests.conftest import make_org
from tests.hub.helpers import message, record

WORKER = Worker("HUB-T1", 1)
SETTINGS = make_org().transport


@pytest.fixture(params=["redis", "memory"])
def queues(request: pytest.FixtureRequest) -> Iterator[MailQueues]:
    if request.param == "memory":
        yield MemoryQueues()
        return
    url = request.getfixturevalue("redis_url")
    r = redis.Redis.from_url(url)
    yield RedisQueues(r, DrainMessages(make_app(url)), lambda: 3600.0)
    r.close()


def _submit(queues: MailQueues, recipients: list[str], *, subject: str = "hello", dedup: str | None = None,
            expires_in_ms: int = 86_400_000) -> tuple[str, str]:
    now = now_ms()
    msg = message(subject=subject, now=now, expires_in_ms=expires_in_ms)
    (item_id,) = queues.new_item_ids(1)
    change = accept(queues.change(), msg, b"Subject: " + subject.encode() + b"\r\n\r\nbody\r\n", recipients,
                    item_id=item_id, settings=SETTINGS, now=now, dedup=dedup, record=record(msg))
    result = queues.commit([change])[0]
    assert result.ok, result
    return msg.id, item_id


def _claim(queues: MailQueues, queue: str, token: str = "t1", n: int = 10, cap: int = 0):
    taken = queues.claim(queue, worker=WORKER, n=n, lease_ms=60_000, cap=cap, token=token)
    assert taken is not None, f"{queue} could not be taken from"
    return taken


SUB = submission_queue("Amsterdam")


def test_an_accepted_message_waits_ready_in_the_submission_queue_and_its_drain_is_queued(queues) -> None:
    msg_id, item_id = _submit(queues, ["bob@contoso.com"])
    (info,) = queues.queues([SUB.identity])
    assert (info.kind, info.message_count, info.ready, info.status) == (QueueKind.SUBMISSION, 1, 1, QueueStatus.READY)
    (item,) = queues.items([item_id])
    assert (item.status, item.msg, [r.address for r in item.recipients]) == ("Ready", msg_id, ["bob@contoso.com"])
    assert queues.bodies([msg_id])[msg_id].startswith(b"Subject: hello")


def test_a_second_arrival_while_a_drain_is_pending_queues_no_second_drain(queues) -> None:
    first = queues.commit([queues.change().kick(SUB.identity, SUB.celery_queue)])[0]
    again = queues.commit([queues.change().kick(SUB.identity, SUB.celery_queue)])[0]
    forced = queues.commit([queues.change().kick(SUB.identity, SUB.celery_queue, force=True)])[0]
    assert (first.drains, again.drains, forced.drains) == ([SUB.identity], [], [SUB.identity])


def test_the_same_origin_is_accepted_once(queues) -> None:
    msg_id, _ = _submit(queues, ["bob@contoso.com"], dedup="MBX-AMS-01/alice@contoso.com/7")
    now = now_ms()
    msg = message(now=now)
    again = accept(queues.change(), msg, b"x", ["bob@contoso.com"], item_id=queues.new_item_ids(1)[0],
                   settings=SETTINGS, now=now, dedup="MBX-AMS-01/alice@contoso.com/7", record=record(msg))
    result = queues.commit([again])[0]
    assert (result.ok, result.failed, result.value) == (False, "first", msg_id)
    assert queues.known("MBX-AMS-01/alice@contoso.com/7") == msg_id
    assert queues.queues([SUB.identity])[0].message_count == 1


def test_claim_takes_items_under_a_lease_and_another_token_cannot_settle_them(queues) -> None:
    _submit(queues, ["bob@contoso.com"], subject="one")
    _submit(queues, ["bob@contoso.com"], subject="two")
    taken = _claim(queues, SUB.identity, n=1)
    assert len(taken.items) == 1 and taken.remaining == 1
    item = taken.items[0]
    assert item.status == ItemStatus.ACTIVE and item.lease == "t1"
    assert taken.messages[item.msg].subject == "one", "oldest first"
    stolen = queues.commit([queues.change().require_lease(item, "other").complete(item, claimed=True)])[0]
    assert (stolen.ok, stolen.failed) == (False, "lease")
    assert queues.items([item.id]), "a change under a lease that is not held changes nothing"
    done = queues.commit([queues.change().require_lease(item, "t1").complete(item, claimed=True)])[0]
    assert done.ok and not queues.items([item.id])


def test_the_last_item_of_a_message_deletes_it_and_its_body(queues) -> None:
    msg_id, _ = _submit(queues, ["bob@contoso.com"])
    (item,) = _claim(queues, SUB.identity).items
    msg = queues.messages([msg_id])[msg_id]
    spec = mapi_queue("Amsterdam", "MBX-AMS-01")
    ids = queues.new_item_ids(2)
    split = queues.change().require_lease(item, "t1")
    for new_id, rcpt in zip(ids, ["bob@contoso.com", "carol@contoso.com"], strict=True):
        split.hold_message(msg_id).enqueue(spec, new_id, msg, [Recipient(rcpt)], now=now_ms())
    assert queues.commit([split.complete(item, claimed=True)])[0].ok
    a, b = _claim(queues, spec.identity).items
    queues.commit([queues.change().require_lease(a, "t1").complete(a, claimed=True)])
    assert msg_id in queues.messages([msg_id]), "one item still holds the message"
    queues.commit([queues.change().require_lease(b, "t1").complete(b, claimed=True)])
    assert queues.messages([msg_id]) == {} and queues.bodies([msg_id]) == {}


def test_a_suspended_queue_and_a_queue_in_retry_give_nothing(queues) -> None:
    _submit(queues, ["bob@contoso.com"])
    queues.commit([queues.change().set_queue(SUB.identity, suspended=1)])
    assert queues.claim(SUB.identity, worker=WORKER, n=5, lease_ms=1000, cap=0, token="t") is None
    assert queues.queues([SUB.identity])[0].status == QueueStatus.SUSPENDED
    queues.commit([queues.change().set_queue(SUB.identity, suspended=0, next_retry=now_ms() + 60_000)])
    assert queues.claim(SUB.identity, worker=WORKER, n=5, lease_ms=1000, cap=0, token="t") is None
    assert queues.queues([SUB.identity])[0].status == QueueStatus.RETRY
    queues.commit([queues.change().set_queue(SUB.identity, next_retry=0)])
    assert len(_claim(queues, SUB.identity).items) == 1


def test_the_connection_cap_admits_no_new_token_but_lets_a_holder_go_on(queues) -> None:
    for i in range(3):
        _submit(queues, ["bob@contoso.com"], subject=f"m{i}")
    _claim(queues, SUB.identity, token="a", n=1, cap=1)
    assert queues.claim(SUB.identity, worker=WORKER, n=1, lease_ms=60_000, cap=1, token="b") is None
    assert len(_claim(queues, SUB.identity, token="a", n=1, cap=1).items) == 1
    queues.release(SUB.identity, "a")
    assert len(_claim(queues, SUB.identity, token="b", n=1, cap=1).items) == 1


def test_park_until_a_time_then_promote(queues) -> None:
    _submit(queues, ["bob@contoso.com"])
    (item,) = _claim(queues, SUB.identity).items
    due = now_ms() - 1
    queues.commit([queues.change().require_lease(item, "t1").park(item, item.recipients, until=due,
                                                                  last_error="451 4.7.0 later")])
    (parked,) = queues.items([item.id])
    assert (parked.status, parked.lease, parked.retries, parked.last_error) == ("Retry", "", 1, "451 4.7.0 later")
    (found,) = queues.due_retries(now_ms(), 10)
    assert queues.commit([queues.change().require_status(found, "Retry").promote(found)])[0].ok
    assert queues.items([item.id])[0].status == "Ready"
    assert queues.due_retries(now_ms(), 10) == []
    assert len(_claim(queues, SUB.identity, token="t2").items) == 1


def test_put_back_returns_an_item_to_the_front_of_its_queue(queues) -> None:
    _submit(queues, ["bob@contoso.com"], subject="first")
    _submit(queues, ["bob@contoso.com"], subject="second")
    first = _claim(queues, SUB.identity, n=1).items[0]
    queues.commit([queues.change().require_lease(first, "t1").put_back(first, status="Retry", last_error="x")])
    again = _claim(queues, SUB.identity, token="t2", n=1)
    assert again.items[0].id == first.id and again.items[0].last_error == "x"


def test_an_expired_lease_is_found_and_its_item_goes_back(queues) -> None:
    _submit(queues, ["bob@contoso.com"])
    taken = queues.claim(SUB.identity, worker=WORKER, n=5, lease_ms=-1, cap=0, token="dead")
    assert taken is not None
    (expired,) = queues.expired_leases(now_ms(), 10)
    assert expired.lease == "dead" and expired.hub == WORKER.hub and expired.pid == WORKER.pid
    change = queues.change().require_lease(expired, "dead").put_back(expired, status="Ready", last_error="died",
                                                                     crashes=1)
    assert queues.commit([change])[0].ok
    assert queues.expired_leases(now_ms(), 10) == []
    assert queues.items([expired.id])[0].crashes == 1


def test_a_suspect_item_is_taken_alone(queues) -> None:
    for i in range(3):
        _submit(queues, ["bob@contoso.com"], subject=f"m{i}")
    a, b, c = _claim(queues, SUB.identity).items
    queues.commit([queues.change().require_lease(x, "t1").put_back(x, status="Ready", last_error="", suspect=True)
                   for x in (c, b)])
    queues.commit([queues.change().require_lease(a, "t1").put_back(a, status="Ready", last_error="")])
    assert [i.id for i in _claim(queues, SUB.identity, token="t2").items] == [a.id]
    assert [i.id for i in _claim(queues, SUB.identity, token="t3").items] == [b.id]


def test_to_poison_moves_the_item_out_of_its_queue_and_it_never_expires(queues) -> None:
    _submit(queues, ["bob@contoso.com"], expires_in_ms=-1)
    (item,) = _claim(queues, SUB.identity).items
    queues.commit([queues.change().require_lease(item, "t1").to_poison(item, crashes=2, reason="boom", now=now_ms())])
    poison = queues.queues(["Amsterdam\\Poison"])[0]
    assert (poison.kind, poison.message_count) == (QueueKind.POISON, 1)
    (held,) = queues.items([item.id])
    assert (held.status, held.queue, held.from_queue) == ("Suspended", "Amsterdam\\Poison", SUB.identity)
    assert queues.expiring(now_ms(), 10) == []
    taken = queues.claim("Amsterdam\\Poison", worker=WORKER, n=5, lease_ms=1000, cap=0, token="p")
    assert taken is not None and taken.items == [], "a poison item is never on a ready list"


def test_an_operator_request_is_guarded_by_the_lease_it_saw(queues) -> None:
    _submit(queues, ["bob@contoso.com"])
    (item,) = _claim(queues, SUB.identity).items
    ask = queues.change().require_status(item, "Active").require_lease(item, "t1").request(item, "PendingSuspend")
    assert queues.commit([ask])[0].ok
    # the worker read the item before the request: its outcome no longer applies as built
    stale = queues.change().require_lease(item, "t1").require_pending(item, "").park(
        item, item.recipients, until=now_ms() + 1000, last_error="")
    assert (queues.commit([stale])[0].failed) == "pending"
    (now,) = queues.items([item.id])
    assert now.pending == PendingAction.SUSPEND
    honoured = queues.change().require_lease(now, "t1").require_pending(now, now.pending).park(
        now, now.recipients, until=None, last_error="").note(now, "Suspended")
    assert queues.commit([honoured])[0].ok
    (held,) = queues.items([item.id])
    assert (held.status, held.pending, held.lease) == ("Suspended", "", "")
    assert queues.request_result(item.id) == "Suspended"


def test_an_admin_change_never_recreates_a_completed_item(queues) -> None:
    _submit(queues, ["bob@contoso.com"])
    (item,) = _claim(queues, SUB.identity).items
    queues.commit([queues.change().require_lease(item, "t1").complete(item, claimed=True)])
    late = queues.change().require_status(item, "Active").require_lease(item, "t1").request(item, "PendingRemove")
    assert queues.commit([late])[0].failed == "status"
    assert queues.items([item.id]) == [], "the request created nothing"
    suspend = queues.change().require_status(item, "Ready").suspend(item)
    assert not queues.commit([suspend])[0].ok and queues.items([item.id]) == []


def test_suspend_and_resume_a_ready_item(queues) -> None:
    _submit(queues, ["bob@contoso.com"])
    (item,) = queues.items(queues.members(SUB.identity))
    assert queues.commit([queues.change().require_status(item, "Ready").suspend(item)])[0].ok
    assert queues.claim(SUB.identity, worker=WORKER, n=5, lease_ms=1000, cap=0, token="x").items == []
    (held,) = queues.items([item.id])
    assert queues.commit([queues.change().require_status(held, "Suspended").resume(held)])[0].ok
    assert len(_claim(queues, SUB.identity).items) == 1


def test_move_resubmits_an_item_to_another_queue(queues) -> None:
    _submit(queues, ["bob@contoso.com"])
    (item,) = queues.items(queues.members(SUB.identity))
    target = mapi_queue("Amsterdam", "MBX-AMS-01")
    assert queues.commit([queues.change().require_status(item, "Ready").move(item, target, now=now_ms())])[0].ok
    assert queues.members(SUB.identity) == [] and queues.members(target.identity) == [item.id]
    assert [i.id for i in _claim(queues, target.identity).items] == [item.id]


def test_expiring_items_and_delay_reports_are_due_in_time(queues) -> None:
    msg_id, item_id = _submit(queues, ["bob@contoso.com"], expires_in_ms=-1)
    assert [i.id for i in queues.expiring(now_ms(), 10)] == [item_id]
    assert queues.due_delay_reports(now_ms() + SETTINGS.delay_notification_timeout * 1000 + 1000, 10) == [msg_id]
    once = queues.change().require_no_delay_report(msg_id).delay_report_sent(msg_id, now_ms())
    assert queues.commit([once])[0].ok
    twice = queues.change().require_no_delay_report(msg_id).delay_report_sent(msg_id, now_ms())
    assert queues.commit([twice])[0].failed == "delay-report"


def test_a_queue_with_ready_mail_and_no_drain_is_stalled(queues) -> None:
    _submit(queues, ["bob@contoso.com"])
    assert queues.stalled_queues(now_ms()) == [], "its drain is pending"
    assert queues.done_draining(SUB.identity) is True, "mail is waiting"
    assert [q.identity for q in queues.stalled_queues(now_ms())] == [SUB.identity]


def test_the_tracking_log_is_written_in_the_same_step(queues) -> None:
    _submit(queues, ["bob@contoso.com"])
    (item,) = _claim(queues, SUB.identity).items
    from mailyard.tracking import Record
    failing = queues.change().require_lease(item, "wrong").track(Record("DELIVER", source="X"), now_ms())
    assert not queues.commit([failing])[0].ok
    if isinstance(queues, MemoryQueues):
        assert [r.event for r in queues.tracked] == ["RECEIVE"]
    else:
        from mailyard import tracking
        assert [r.event for r in tracking.search(queues.r)] == ["RECEIVE"]


def test_no_guard_passes_on_an_item_that_is_gone(queues) -> None:
    _submit(queues, ["bob@contoso.com"])
    (item,) = _claim(queues, SUB.identity).items
    queues.commit([queues.change().require_lease(item, "t1").complete(item, claimed=True)])
    for guard in ("require_pending", "require_status"):
        change = getattr(queues.change(), guard)(item, "").put_back(item, status="Ready", last_error="x")
        assert not queues.commit([change])[0].ok, f"{guard}('') passed on a deleted item"
    assert queues.items([item.id]) == [], "no husk was re-created"


def test_a_message_moved_out_of_poison_expires_again(queues) -> None:
    msg_id, _ = _submit(queues, ["bob@contoso.com"], expires_in_ms=-1)
    (item,) = _claim(queues, SUB.identity).items
    queues.commit([queues.change().require_lease(item, "t1").to_poison(item, crashes=2, reason="x", now=now_ms())])
    assert queues.expiring(now_ms(), 10) == []
    (held,) = queues.items([item.id])
    expires = queues.messages([msg_id])[msg_id].expires
    queues.commit([queues.change().require_state(held).move(held, SUB, now=now_ms(), expires=expires)])
    assert [i.id for i in queues.expiring(now_ms(), 10)] == [item.id]


def test_a_lease_renewed_before_it_expires_keeps_the_item_and_the_connection(queues) -> None:
    _submit(queues, ["bob@contoso.com"])
    taken = queues.claim(SUB.identity, worker=WORKER, n=5, lease_ms=1000, cap=0, token="t1")
    assert taken is not None
    (item,) = taken.items
    soon = now_ms() + 5000  # past the lease as taken, well before it as renewed
    assert [i.id for i in queues.expired_leases(soon, 10)] == [item.id], "unrenewed, it would be due"
    assert queues.renew(SUB.identity, "t1", [item.id], 60_000) == [item.id]
    assert queues.expired_leases(soon, 10) == [], "renewed: the sweeper does not take it back"
    assert queues.queues([SUB.identity])[0].connections == 1
    (held,) = queues.items([item.id])
    assert (held.status, held.lease) == (ItemStatus.ACTIVE, "t1"), "renewing changes nothing else"
    assert [i.id for i in queues.expired_leases(now_ms() + 120_000, 10)] == [item.id], "a renewal is not forever"
    assert queues.commit([queues.change().require_lease(item, "t1").complete(item, claimed=True)])[0].ok


def test_a_lease_renewed_after_the_sweeper_read_it_as_expired_stays_its_workers(queues) -> None:
    _submit(queues, ["bob@contoso.com"])
    slow = queues.claim(SUB.identity, worker=WORKER, n=5, lease_ms=-1, cap=0, token="slow")
    assert slow is not None
    now = now_ms()
    (expired,) = queues.expired_leases(now, 10)  # the sweeper reads it as expired...
    assert queues.renew(SUB.identity, "slow", [expired.id], 60_000) == [expired.id]  # ...its worker renews
    taking_back = (queues.change().require_lease(expired, "slow").require_lease_expired(expired, now)
                   .put_back(expired, status="Ready", last_error="lease expired"))
    result = queues.commit([taking_back])[0]
    assert not result.ok and result.failed == "lease expired", "taken back from a worker that renewed"
    (held,) = queues.items([expired.id])
    assert (held.status, held.lease) == (ItemStatus.ACTIVE, "slow"), "still its worker's, in flight"
    other = queues.claim(SUB.identity, worker=Worker("HUB-T2", 2), n=5, lease_ms=1000, cap=0, token="other")
    assert other is None or other.items == [], "nobody else can claim it while its worker delivers it"


def test_a_stale_lease_holder_renews_nothing(queues) -> None:
    _submit(queues, ["bob@contoso.com"])
    # the first worker stalls: its lease runs out, the sweeper puts the item back, another takes it
    dead = queues.claim(SUB.identity, worker=WORKER, n=5, lease_ms=-1, cap=0, token="stale")
    assert dead is not None
    (expired,) = queues.expired_leases(now_ms(), 10)
    assert queues.commit([queues.change().require_lease(expired, "stale").put_back(
        expired, status="Ready", last_error="lease expired")])[0].ok
    fresh = queues.claim(SUB.identity, worker=Worker("HUB-T2", 2), n=5, lease_ms=1000, cap=1, token="fresh")
    assert fresh is not None and [i.id for i in fresh.items] == [expired.id]
    assert queues.renew(SUB.identity, "stale", [expired.id], 60_000) == [], "refused"
    soon = now_ms() + 5000
    (due,) = queues.expired_leases(soon, 10)
    assert due.lease == "fresh", "the stale renewal did not extend the new holder's lease"
    (info,) = queues.queues([SUB.identity])
    assert info.connections == 1, "nor got the stale holder a connection slot back"
    assert queues.claim(SUB.identity, worker=WORKER, n=1, lease_ms=1000, cap=1, token="stale") is None, \
        "the cap still counts only the new holder"
    # the holder's own renewal works, and once it finished nobody renews the item back
    assert queues.renew(SUB.identity, "fresh", [expired.id], 60_000) == [expired.id]
    item = fresh.items[0]
    assert queues.commit([queues.change().require_lease(item, "fresh").complete(item, claimed=True)])[0].ok
    assert queues.renew(SUB.identity, "fresh", [expired.id], 60_000) == []
    assert queues.items([expired.id]) == [] and queues.expired_leases(now_ms() + 120_000, 10) == []
