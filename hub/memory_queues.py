"""The mail queue contract (mailyard.hub.queues) in memory, for fast tests of the stages.

It keeps the same state as the Redis implementation (items, ready lists, schedules,
messages, the tracking log) in dictionaries under one lock, and applies each ``Change``
atomically: every guard checked at commit time, then every effect. The categorizer, the
outcomes of a delivery, the sweeper's rules and the operator's actions run against it
unchanged; tests/hub/test_queues.py holds it to the same behaviour as the Redis one.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Self

from mailyard.hub.queues import (
    DRAINED,
    Change,
    Claimed,
    Committed,
    QueueInfo,
    QueueSpec,
    Worker,
    poison_queue,
    queue_status,
)
from mailyard.hub.records import Item, ItemStatus, Message, QueueKind, Recipient

if TYPE_CHECKING:
    from mailyard.tracking import Record


def _now() -> int:
    return int(time.time() * 1000)


@dataclass
class _Queue:
    spec: QueueSpec
    created: int
    state: dict[str, str | int] = field(default_factory=dict)  # suspended, failures, next_retry, ...
    ready: list[str] = field(default_factory=list)
    members: dict[str, int] = field(default_factory=dict)
    conns: dict[str, int] = field(default_factory=dict)


@dataclass
class _Stored:
    msg: Message
    body: bytes
    refs: int
    items: set[str] = field(default_factory=set)
    delay_dsn_sent: int = 0


Guard = Callable[["MemoryQueues"], tuple[bool, str | None]]
Effect = Callable[["MemoryQueues"], object]


class MemoryChange:
    def __init__(self, store: MemoryQueues) -> None:
        self._store = store
        self.guards: list[tuple[str, Guard]] = []
        self.effects: list[Effect] = []
        self.kicks: list[tuple[str, bool]] = []

    def _do(self, effect: Effect) -> Self:
        self.effects.append(effect)
        return self

    # guards

    def _item_field(self, name: str, item_id: str, attr: str, value: str) -> Self:
        def check(s: MemoryQueues) -> tuple[bool, str | None]:
            it = s.item_map.get(item_id)  # (a guard never passes on an item that is gone)
            return it is not None and getattr(it, attr) == value, None
        self.guards.append((name, check))
        return self

    def require_lease(self, item: Item, token: str) -> Self:
        return self._item_field("lease", item.id, "lease", token)

    def require_lease_expired(self, item: Item, now: int) -> Self:
        def check(s: MemoryQueues) -> tuple[bool, str | None]:
            until = s.inflight.get(item.id)
            return until is not None and until <= now, None
        self.guards.append(("lease expired", check))
        return self

    def require_status(self, item: Item, status: str) -> Self:
        return self._item_field("status", item.id, "status", status)

    def require_state(self, item: Item) -> Self:
        def check(s: MemoryQueues) -> tuple[bool, str | None]:
            it = s.item_map.get(item.id)
            return it is not None and (it.queue, it.status, it.retries) == (item.queue, item.status, item.retries), None
        self.guards.append(("state", check))
        return self

    def require_pending(self, item: Item, pending: str) -> Self:
        return self._item_field("pending", item.id, "pending", pending)

    def require_new_message(self, msg_id: str) -> Self:
        self.guards.append(("new", lambda s: (msg_id not in s.stored, None)))
        return self

    def require_first(self, dedup: str) -> Self:
        self.guards.append(("first", lambda s: (dedup not in s.dedup, s.dedup.get(dedup))))
        return self

    def require_no_delay_report(self, msg_id: str) -> Self:
        self.guards.append(("message", lambda s: (msg_id in s.stored, None)))
        self.guards.append(("delay-report", lambda s: (not s.stored[msg_id].delay_dsn_sent, None)))
        return self

    # messages

    def add_message(self, msg: Message, body: bytes, *, refs: int, delay_report_at: int = 0) -> Self:
        def add(s: MemoryQueues) -> None:
            s.stored[msg.id] = _Stored(copy.deepcopy(msg), body, refs)
            if delay_report_at and msg.wants_report:
                s.delay[msg.id] = delay_report_at
        return self._do(add)

    def hold_message(self, msg_id: str) -> Self:
        def hold(s: MemoryQueues) -> None:
            if msg_id in s.stored:
                s.stored[msg_id].refs += 1
        return self._do(hold)

    def remember(self, dedup: str, msg_id: str, ttl_s: int) -> Self:
        return self._do(lambda s: s.dedup.__setitem__(dedup, msg_id))

    def delay_report_sent(self, msg_id: str, now: int) -> Self:
        return self._do(lambda s: setattr(s.stored[msg_id], "delay_dsn_sent", now))

    def unschedule_delay_report(self, msg_id: str) -> Self:
        return self._do(lambda s: s.delay.pop(msg_id, None) and None)

    def schedule_delay_report(self, msg_id: str, at: int) -> Self:
        return self._do(lambda s: s.delay.__setitem__(msg_id, at))

    # items

    def enqueue(self, spec: QueueSpec, item_id: str, msg: Message, recipients: list[Recipient], *,
                now: int) -> Self:
        self.ensure_queue(spec, now)

        def add(s: MemoryQueues) -> None:
            s.item_map[item_id] = Item(item_id, msg.id, spec.identity, copy.deepcopy(recipients),
                                       status=ItemStatus.READY.value, enqueued=now)
            q = s.queue_map[spec.identity]
            q.members[item_id] = now
            q.ready.append(item_id)
            if msg.id in s.stored:
                s.stored[msg.id].items.add(item_id)
            if msg.expires and spec.kind is not QueueKind.POISON:
                s.expiry[item_id] = msg.expires
        self._do(add)
        return self.kick(spec.identity, spec.celery_queue) if spec.kind in DRAINED else self

    def complete(self, item: Item, *, claimed: bool) -> Self:
        def forget(s: MemoryQueues) -> None:
            it = s.item_map.pop(item.id, None)
            q = s.queue_map.get(item.queue)
            if q:
                q.members.pop(item.id, None)
                if not claimed and item.id in q.ready:
                    q.ready.remove(item.id)
            for index in (s.inflight, s.retry, s.expiry):
                index.pop(item.id, None)
            stored = s.stored.get(item.msg)
            if stored and it is not None:
                stored.items.discard(item.id)
            if stored:
                stored.refs -= 1
                if stored.refs <= 0:
                    del s.stored[item.msg]
                    s.delay.pop(item.msg, None)
        return self._do(forget)

    def _update(self, item_id: str, **changes: Any) -> Effect:
        def update(s: MemoryQueues) -> None:
            it = s.item_map.get(item_id)
            if it is not None:
                s.item_map[item_id] = replace(it, **changes)
        return update

    def _unlease(self, item: Item) -> None:
        self._do(self._update(item.id, lease="", hub="", pid=0, pending=""))
        self._do(lambda s: s.inflight.pop(item.id, None) and None)

    def park(self, item: Item, recipients: list[Recipient], *, until: int | None, last_error: str) -> Self:
        status = ItemStatus.RETRY if until is not None else ItemStatus.SUSPENDED
        self._do(self._update(item.id, recipients=copy.deepcopy(recipients), status=status.value,
                              retries=item.retries + 1, last_error=last_error[:500], next_retry=until or 0))
        self._unlease(item)
        if until is not None:
            self._do(lambda s: s.retry.__setitem__(item.id, until))
        return self

    def put_back(self, item: Item, *, status: str, last_error: str, recipients: list[Recipient] | None = None,
                 crashes: int | None = None, retries: int | None = None, suspect: bool = False) -> Self:
        changes: dict[str, object] = {"status": status, "last_error": last_error[:500]}
        if recipients is not None:
            changes["recipients"] = copy.deepcopy(recipients)
        if crashes is not None:
            changes["crashes"] = crashes
        if retries is not None:
            changes["retries"] = retries
        if suspect:
            changes["suspect"] = True
        self._do(self._update(item.id, **changes))
        self._unlease(item)
        return self._do(lambda s: s.queue_map[item.queue].ready.insert(0, item.id))

    def to_poison(self, item: Item, *, crashes: int, reason: str, now: int) -> Self:
        spec = poison_queue(item.site)
        self.ensure_queue(spec, now)
        self._do(self._update(item.id, crashes=crashes, status=ItemStatus.SUSPENDED.value, queue=spec.identity,
                              from_queue=item.queue, last_error=f"poison: {reason}"[:500]))
        self._unlease(item)

        def move(s: MemoryQueues) -> None:
            s.queue_map[item.queue].members.pop(item.id, None)
            s.queue_map[spec.identity].members[item.id] = now
            s.expiry.pop(item.id, None)
        return self._do(move)

    def request(self, item: Item, pending: str, *, ndr: bool = True) -> Self:
        self._do(lambda s: s.results.pop(item.id, None))
        return self._do(self._update(item.id, pending=pending, remove_ndr=ndr))

    def note(self, item: Item, result: str) -> Self:
        return self._do(lambda s: s.results.__setitem__(item.id, result))

    def suspend(self, item: Item) -> Self:
        self._do(self._update(item.id, status=ItemStatus.SUSPENDED.value, pending=""))

        def off(s: MemoryQueues) -> None:
            q = s.queue_map[item.queue]
            if item.id in q.ready:
                q.ready.remove(item.id)
            s.retry.pop(item.id, None)
        return self._do(off)

    def resume(self, item: Item) -> Self:
        return self._ready(item, item.queue)

    def promote(self, item: Item) -> Self:
        self._do(lambda s: s.retry.pop(item.id, None) and None)
        return self._ready(item, item.queue)

    def _ready(self, item: Item, queue: str) -> Self:
        self._do(self._update(item.id, status=ItemStatus.READY.value, next_retry=0))
        self._do(lambda s: s.queue_map[queue].ready.append(item.id))
        known = self._store.queue_map.get(queue)
        return self.kick(queue, known.spec.celery_queue) if known and known.spec.kind in DRAINED else self

    def move(self, item: Item, target: QueueSpec, *, now: int, expires: int = 0, reset_crashes: bool = False
             ) -> Self:
        self.ensure_queue(target, now)
        if expires and target.kind is not QueueKind.POISON:
            self._do(lambda s: s.expiry.__setitem__(item.id, expires))
        changes: dict[str, object] = {"queue": target.identity, "pending": "", "suspect": False, "from_queue": ""}
        if reset_crashes:
            changes["crashes"] = 0
        self._do(self._update(item.id, **changes))

        def move(s: MemoryQueues) -> None:
            old = s.queue_map.get(item.queue)
            if old:
                old.members.pop(item.id, None)
                if item.id in old.ready:
                    old.ready.remove(item.id)
            s.retry.pop(item.id, None)
            s.queue_map[target.identity].members[item.id] = now
        self._do(move)
        self._do(self._update(item.id, status=ItemStatus.READY.value, next_retry=0))
        self._do(lambda s: s.queue_map[target.identity].ready.append(item.id))
        return self.kick(target.identity, target.celery_queue) if target.kind in DRAINED else self

    # queues

    def ensure_queue(self, spec: QueueSpec, now: int) -> Self:
        return self._do(lambda s: s.queue_map.setdefault(spec.identity, _Queue(spec, now)) and None)

    def set_queue(self, identity: str, **fields: str | int) -> Self:
        def update(s: MemoryQueues) -> None:
            if identity in s.queue_map:
                s.queue_map[identity].state.update(fields)
        return self._do(update)

    def kick(self, identity: str, celery_queue: str, *, force: bool = False) -> Self:
        self.kicks.append((identity, force))
        return self

    # the tracking log

    def track(self, record: Record, now: int) -> Self:
        return self._do(lambda s: s.tracked.append(copy.deepcopy(record)))


class MemoryQueues:
    """The contract's in-memory implementation. ``drains`` lists every drain task queued."""

    def __init__(self, retention_s: float = 7 * 86400, kick_ttl_ms: int = 10_000) -> None:
        self.retention_s = retention_s
        self.kick_ttl_ms = kick_ttl_ms
        self.lock = threading.RLock()
        self.queue_map: dict[str, _Queue] = {}
        self.item_map: dict[str, Item] = {}
        self.stored: dict[str, _Stored] = {}
        self.inflight: dict[str, int] = {}
        self.retry: dict[str, int] = {}
        self.expiry: dict[str, int] = {}
        self.delay: dict[str, int] = {}
        self.dedup: dict[str, str] = {}
        self.markers: dict[str, int] = {}  # queue -> kick marker expiry, ms
        self.tracked: list[Record] = []
        self.results: dict[str, str] = {}
        self.drains: list[str] = []
        self._ids = itertools.count(1)

    def change(self) -> MemoryChange:
        return MemoryChange(self)

    def commit(self, changes: Sequence[Change], *, replicated: bool = False) -> list[Committed]:
        own = []  # (``replicated``: memory has no replicas to wait for)
        for change in changes:
            if not isinstance(change, MemoryChange):  # one from another implementation: a bug
                raise TypeError(f"a {type(change).__name__} cannot be committed to memory")
            own.append(change)
        out = []
        with self.lock:
            for change in own:
                out.append(self._apply(change))
        return out

    def _apply(self, change: MemoryChange) -> Committed:
        for name, check in change.guards:
            ok, value = check(self)
            if not ok:
                return Committed(False, name, value)
        for effect in change.effects:
            effect(self)
        now = _now()
        kicked = []
        for identity, force in change.kicks:
            if force or self.markers.get(identity, 0) <= now:
                self.markers[identity] = now + self.kick_ttl_ms
                self.drains.append(identity)
                kicked.append(identity)
        return Committed(True, drains=kicked)

    def new_item_ids(self, count: int) -> list[str]:
        return [str(next(self._ids)) for _ in range(count)]

    # leases

    def claim(self, queue: str, *, worker: Worker, n: int, lease_ms: int, cap: int, token: str
              ) -> Claimed | None:
        with self.lock:
            now = _now()
            q = self.queue_map.get(queue)
            if q is None:
                return Claimed([], {}, 0)
            if q.state.get("suspended") in (1, "1") or int(q.state.get("next_retry", 0) or 0) > now:
                return None
            q.conns = {t: until for t, until in q.conns.items() if until > now}
            if cap > 0 and token not in q.conns and len(q.conns) >= cap:
                return None
            if self.markers.get(queue, 0) > now:  # (as Redis: an expired marker is gone)
                self.markers[queue] = now + self.kick_ttl_ms
            ids: list[str] = []
            while len(ids) < n and q.ready:
                item_id = q.ready.pop(0)
                it = self.item_map.get(item_id)
                if it is not None and it.suspect:
                    if not ids:
                        ids.append(item_id)
                    else:
                        q.ready.insert(0, item_id)
                    break
                ids.append(item_id)
            items, messages = [], {}
            if ids:
                q.conns[token] = now + lease_ms
            for item_id in ids:
                it = self.item_map.get(item_id)
                if it is None:
                    continue
                it = self.item_map[item_id] = replace(it, status=ItemStatus.ACTIVE.value, lease=token,
                                                      hub=worker.hub, leased=now, pid=worker.pid)
                self.inflight[item_id] = now + lease_ms
                items.append(copy.deepcopy(it))
                if it.msg in self.stored:
                    messages[it.msg] = copy.deepcopy(self.stored[it.msg].msg)
            return Claimed(items, messages, len(q.ready))

    def renew(self, queue: str, token: str, item_ids: list[str], lease_ms: int) -> list[str]:
        with self.lock:
            until = _now() + lease_ms
            renewed = []
            for i in item_ids:
                it = self.item_map.get(i)
                if it is not None and it.status == ItemStatus.ACTIVE and it.lease == token:
                    self.inflight[i] = until
                    renewed.append(i)
            q = self.queue_map.get(queue)
            if q and token in q.conns and (renewed or not item_ids):
                q.conns[token] = until
            return renewed

    def release(self, queue: str, token: str) -> None:
        with self.lock:
            if queue in self.queue_map:
                self.queue_map[queue].conns.pop(token, None)

    def celery_queue_of(self, identity: str) -> str:
        known = self.queue_map.get(identity)
        return known.spec.celery_queue if known else ""

    def done_draining(self, queue: str) -> bool:
        with self.lock:
            self.markers.pop(queue, None)
            return bool(queue in self.queue_map and self.queue_map[queue].ready)

    # reading

    def queues(self, identities: list[str] | None = None) -> list[QueueInfo]:
        with self.lock:
            now = _now()
            names = identities if identities is not None else sorted(
                self.queue_map, key=lambda i: self.queue_map[i].created)
            out = []
            for name in names:
                q = self.queue_map.get(name)
                if q is None:
                    continue
                suspended = q.state.get("suspended") in (1, "1")
                next_retry = int(q.state.get("next_retry", 0) or 0)
                conns = sum(1 for until in q.conns.values() if until >= now)
                out.append(QueueInfo(
                    identity=name, site=q.spec.site, kind=q.spec.kind, delivery_type=q.spec.delivery_type.value,
                    next_hop=q.spec.next_hop, status=queue_status(suspended, next_retry, conns, now),
                    message_count=len(q.members), ready=len(q.ready), last_error=str(q.state.get("last_error", "")),
                    last_retry=int(q.state.get("last_retry", 0) or 0),
                    next_retry=next_retry if next_retry > now else 0, failures=int(q.state.get("failures", 0) or 0),
                    connections=conns, celery_queue=q.spec.celery_queue, connector=q.spec.connector,
                    created=q.created, suspended=suspended,
                ))
            return out

    def members(self, queue: str, limit: int = -1) -> list[str]:
        with self.lock:
            q = self.queue_map.get(queue)
            ids = sorted(q.members, key=lambda i: (q.members[i], int(i))) if q else []
            return ids if limit < 0 else ids[:limit]

    def items(self, ids: list[str]) -> list[Item]:
        with self.lock:
            return [copy.deepcopy(self.item_map[i]) for i in ids if i in self.item_map]

    def items_of(self, msg_id: str) -> list[Item]:
        with self.lock:
            stored = self.stored.get(msg_id)
            return self.items(sorted(stored.items, key=int)) if stored else []

    def messages(self, ids: list[str]) -> dict[str, Message]:
        with self.lock:
            return {m: copy.deepcopy(self.stored[m].msg) for m in ids if m in self.stored}

    def bodies(self, ids: list[str]) -> dict[str, bytes]:
        with self.lock:
            return {m: self.stored[m].body for m in ids if m in self.stored}

    def known(self, dedup: str) -> str | None:
        return self.dedup.get(dedup)

    def request_result(self, item_id: str) -> str | None:
        return self.results.get(item_id)

    # the sweeper's schedules

    @staticmethod
    def _due(schedule: dict[str, int], now: int, limit: int) -> list[str]:
        return [i for i, t in sorted(schedule.items(), key=lambda kv: kv[1]) if t <= now][:limit]

    def _loaded(self, schedule: dict[str, int], now: int, limit: int, status: str) -> list[Item]:
        with self.lock:
            ids = self._due(schedule, now, limit)
            for i in ids:
                it = self.item_map.get(i)
                if it is None or it.status != status:
                    schedule.pop(i, None)
            return [copy.deepcopy(self.item_map[i]) for i in ids if i in schedule]

    def expired_leases(self, now: int, limit: int) -> list[Item]:
        return self._loaded(self.inflight, now, limit, ItemStatus.ACTIVE.value)

    def due_retries(self, now: int, limit: int) -> list[Item]:
        return self._loaded(self.retry, now, limit, ItemStatus.RETRY.value)

    def expiring(self, now: int, limit: int) -> list[Item]:
        with self.lock:
            return self.items(self._due(self.expiry, now, limit))

    def due_delay_reports(self, now: int, limit: int) -> list[str]:
        with self.lock:
            return self._due(self.delay, now, limit)

    def stalled_queues(self, now: int) -> list[QueueInfo]:
        with self.lock:
            return [q for q in self.queues() if q.ready and not q.suspended and not q.next_retry
                    and not q.connections and q.kind in DRAINED
                    and self.markers.get(q.identity, 0) <= now]

    # for tests: lease time passes
    def expire_leases(self) -> None:
        with self.lock:
            for i in self.inflight:
                self.inflight[i] = 0
            for q in self.queue_map.values():
                q.conns = {}
