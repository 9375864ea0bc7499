"""The mail queue contract (mailyard.hub.queues) in Redis: the implementation hubs run.

Each ``Change`` is one guarded transaction (mailyard.txn, core/lua/txn.lua): one Lua call,
so guards and effects are atomic and a crash cannot split them. ``claim`` is
core/lua/claim.lua, ``renew`` core/lua/renew.lua. The keys are those of mailyard.keys; the fields those of
mailyard.hub.records.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Self

import redis
import redis.asyncio

from mailyard import keys, tracking
from mailyard.broker import DrainMessages
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
from mailyard.hub.records import (
    DeliveryType,
    Item,
    ItemStatus,
    Message,
    QueueKind,
    Recipient,
    rcpts_json,
)
from mailyard.redisconn import flat_text_map, number, text, text_map, text_or_none, texts
from mailyard.registry import now_ms
from mailyard.scripts import script
from mailyard.txn import Result, Txn, Word, run_all

if TYPE_CHECKING:
    from mailyard.tracking import Record

ITEM_PREFIX = keys.item("")
REQUEST_RESULT_S = 86400  # how long what became of an operator's request is kept
MSG_PREFIX = keys.msg("")


class RedisChange:
    """One atomic step, built as a guarded ``Txn``."""

    def __init__(self, store: RedisQueues) -> None:
        self._store = store
        self.txn = Txn()
        self._guards: list[str] = []

    def _guard(self, name: str) -> None:
        self._guards.append(name)

    def committed(self, result: Result) -> Committed:
        if result.ok:
            return Committed(True, drains=result.kicked)
        name = self._guards[result.failed_guard - 1] if 0 < result.failed_guard <= len(self._guards) else "?"
        return Committed(False, name, text_or_none(result.value))

    # guards

    def require_lease(self, item: Item, token: str) -> Self:
        self.txn.guard_eq(keys.item(item.id), "lease", token)
        self._guard("lease")
        return self

    def require_lease_expired(self, item: Item, now: int) -> Self:
        self.txn.guard_score_at_most(keys.INFLIGHT, item.id, now)
        self._guard("lease expired")
        return self

    def require_status(self, item: Item, status: str) -> Self:
        self.txn.guard_eq(keys.item(item.id), "status", status)
        self._guard("status")
        return self

    def require_state(self, item: Item) -> Self:
        key = keys.item(item.id)
        self.txn.guard_eq(key, "queue", item.queue).guard_eq(key, "status", item.status)
        self.txn.guard_eq(key, "retries", str(item.retries) if item.retries else "")
        self._guards += ["queue", "status", "retries"]
        return self

    def require_pending(self, item: Item, pending: str) -> Self:
        self.txn.guard_eq(keys.item(item.id), "pending", pending)
        self._guard("pending")
        return self

    def require_new_message(self, msg_id: str) -> Self:
        self.txn.guard_absent(keys.msg(msg_id))
        self._guard("new")
        return self

    def require_first(self, dedup: str) -> Self:
        self.txn.guard_absent(keys.dedup(dedup))
        self._guard("first")
        return self

    def require_no_delay_report(self, msg_id: str) -> Self:
        self.txn.guard_exists(keys.msg(msg_id)).guard_no_field(keys.msg(msg_id), "delay_dsn_sent")
        self._guards += ["message", "delay-report"]
        return self

    # messages

    def add_message(self, msg: Message, body: bytes, *, refs: int, delay_report_at: int = 0) -> Self:
        self.txn.hset(keys.msg(msg.id), {**msg.fields(), "refs": refs})
        self.txn.op("SET", keys.body(msg.id), body)
        if delay_report_at and msg.wants_report:
            self.txn.op("ZADD", keys.DELAY, delay_report_at, msg.id)
        return self

    def hold_message(self, msg_id: str) -> Self:
        self.txn.op("HINCRBY", keys.msg(msg_id), "refs", 1)
        return self

    def remember(self, dedup: str, msg_id: str, ttl_s: int) -> Self:
        self.txn.op("SET", keys.dedup(dedup), msg_id, "EX", ttl_s)
        return self

    def delay_report_sent(self, msg_id: str, now: int) -> Self:
        self.txn.op("HSET", keys.msg(msg_id), "delay_dsn_sent", now)
        return self

    def unschedule_delay_report(self, msg_id: str) -> Self:
        self.txn.op("ZREM", keys.DELAY, msg_id)
        return self

    def schedule_delay_report(self, msg_id: str, at: int) -> Self:
        self.txn.op("ZADD", keys.DELAY, at, msg_id)
        return self

    # items

    def enqueue(self, spec: QueueSpec, item_id: str, msg: Message, recipients: list[Recipient], *,
                now: int) -> Self:
        self.ensure_queue(spec, now)
        t = self.txn
        t.hset(keys.item(item_id), {"msg": msg.id, "queue": spec.identity, "rcpts": rcpts_json(recipients),
                                    "status": ItemStatus.READY.value, "enqueued": now})
        t.op("ZADD", keys.queue_members(spec.identity), now, item_id)
        t.op("SADD", keys.msg_items(msg.id), item_id)
        if msg.expires and spec.kind is not QueueKind.POISON:
            t.op("ZADD", keys.EXPIRY, msg.expires, item_id)
        t.op("RPUSH", keys.ready(spec.identity), item_id)
        return self.kick(spec.identity, spec.celery_queue) if spec.kind in DRAINED else self

    def complete(self, item: Item, *, claimed: bool) -> Self:
        # ``claimed``: claim took it off the ready list, so the list is not searched (LREM is
        # linear in the backlog: with 100,000 ready items it cost 2.3 ms of Redis per
        # message). A stale id left there all the same is skipped by claim.
        t = self.txn
        t.op("DEL", keys.item(item.id))
        t.op("ZREM", keys.queue_members(item.queue), item.id)
        if not claimed:
            t.op("LREM", keys.ready(item.queue), 0, item.id)
        for index in (keys.INFLIGHT, keys.RETRY, keys.EXPIRY):
            t.op("ZREM", index, item.id)
        t.op("SREM", keys.msg_items(item.msg), item.id)
        t.decref(item.msg)
        return self

    def _unlease(self, item: Item) -> None:
        self.txn.op("HDEL", keys.item(item.id), "lease", "hub", "pid", "pending")
        self.txn.op("ZREM", keys.INFLIGHT, item.id)

    def park(self, item: Item, recipients: list[Recipient], *, until: int | None, last_error: str) -> Self:
        status = ItemStatus.RETRY if until is not None else ItemStatus.SUSPENDED
        self.txn.hset(keys.item(item.id), {"rcpts": rcpts_json(recipients), "status": status.value,
                                           "retries": item.retries + 1, "last_error": last_error[:500],
                                           "next_retry": until or 0})
        self._unlease(item)
        if until is not None:
            self.txn.op("ZADD", keys.RETRY, until, item.id)
        return self

    def put_back(self, item: Item, *, status: str, last_error: str, recipients: list[Recipient] | None = None,
                 crashes: int | None = None, retries: int | None = None, suspect: bool = False) -> Self:
        fields: dict[str, Word] = {"status": status, "last_error": last_error[:500]}
        if recipients is not None:
            fields["rcpts"] = rcpts_json(recipients)
        if crashes is not None:
            fields["crashes"] = crashes
        if retries is not None:
            fields["retries"] = retries
        if suspect:
            fields["suspect"] = 1
        self.txn.hset(keys.item(item.id), fields)
        self._unlease(item)
        self.txn.op("LPUSH", keys.ready(item.queue), item.id)
        return self

    def to_poison(self, item: Item, *, crashes: int, reason: str, now: int) -> Self:
        spec = poison_queue(item.site)
        self.ensure_queue(spec, now)
        t = self.txn
        t.hset(keys.item(item.id), {"crashes": crashes, "status": ItemStatus.SUSPENDED.value,
                                    "queue": spec.identity, "from_queue": item.queue,
                                    "last_error": f"poison: {reason}"[:500]})
        self._unlease(item)
        t.op("ZREM", keys.queue_members(item.queue), item.id)
        t.op("ZADD", keys.queue_members(spec.identity), now, item.id)
        t.op("ZREM", keys.EXPIRY, item.id)  # poison messages never expire
        return self

    def request(self, item: Item, pending: str, *, ndr: bool = True) -> Self:
        self.txn.hset(keys.item(item.id), {"pending": pending, "remove_ndr": int(ndr)})
        self.txn.op("DEL", keys.request_result(item.id))
        return self

    def note(self, item: Item, result: str) -> Self:
        self.txn.op("SET", keys.request_result(item.id), result, "EX", REQUEST_RESULT_S)
        return self

    def suspend(self, item: Item) -> Self:
        self.txn.hset(keys.item(item.id), {"status": ItemStatus.SUSPENDED.value})
        self.txn.op("HDEL", keys.item(item.id), "pending")
        self.txn.op("LREM", keys.ready(item.queue), 0, item.id)
        self.txn.op("ZREM", keys.RETRY, item.id)
        return self

    def resume(self, item: Item) -> Self:
        return self._ready(item, item.queue)

    def promote(self, item: Item) -> Self:
        self.txn.op("ZREM", keys.RETRY, item.id)
        return self._ready(item, item.queue)

    def _ready(self, item: Item, queue: str) -> Self:
        self.txn.hset(keys.item(item.id), {"status": ItemStatus.READY.value, "next_retry": 0})
        self.txn.op("RPUSH", keys.ready(queue), item.id)
        return self.kick(queue, self._store.celery_queue_of(queue)) if self._store.kind_of(queue) in DRAINED else self

    def move(self, item: Item, target: QueueSpec, *, now: int, expires: int = 0, reset_crashes: bool = False
             ) -> Self:
        self.ensure_queue(target, now)
        if expires and target.kind is not QueueKind.POISON:
            self.txn.op("ZADD", keys.EXPIRY, expires, item.id)
        t = self.txn
        fields: dict[str, Word] = {"queue": target.identity}
        if reset_crashes:
            fields["crashes"] = 0
        t.hset(keys.item(item.id), fields)
        t.op("HDEL", keys.item(item.id), "pending", "suspect", "from_queue")
        t.op("ZREM", keys.queue_members(item.queue), item.id)
        t.op("LREM", keys.ready(item.queue), 0, item.id)
        t.op("ZREM", keys.RETRY, item.id)
        t.op("ZADD", keys.queue_members(target.identity), now, item.id)
        self._store.remember_queue(target)
        return self._ready(item, target.identity)

    # queues

    def ensure_queue(self, spec: QueueSpec, now: int) -> Self:
        self.txn.op("@queue", keys.queue(spec.identity), keys.QUEUES, spec.identity, spec.site, spec.kind.value,
                    spec.delivery_type.value, spec.next_hop, spec.celery_queue, spec.connector, now)
        self._store.remember_queue(spec)
        return self

    def set_queue(self, identity: str, **fields: str | int) -> Self:
        self.txn.hset_if_exists(keys.queue(identity), dict(fields))
        return self

    def kick(self, identity: str, celery_queue: str, *, force: bool = False) -> Self:
        self.txn.kick(self._store.drains, identity, celery_queue, force=force)
        return self

    # the tracking log

    def track(self, record: Record, now: int) -> Self:
        tracking.add(self.txn, record, self._store.retention_s, now)
        return self

    # schedule hygiene (used by the store's reads)

    def drop_unless(self, item_id: str, field: str, value: str, schedule: str) -> Self:
        self.txn.op("@zrem_unless", keys.item(item_id), field, value, schedule, item_id)
        return self


def _kind_of(d: dict[str, str]) -> QueueKind:
    """The queue's kind; queues created before it was stored are known by their fields."""
    if d.get("kind"):
        return QueueKind(d["kind"])
    if d.get("type") == DeliveryType.UNREACHABLE.value:
        return QueueKind.UNREACHABLE
    if d.get("type") == DeliveryType.UNDEFINED.value:
        return QueueKind.POISON if d.get("next_hop") == "Poison" else QueueKind.SUBMISSION
    return QueueKind.DELIVERY


def _own(change: Change) -> RedisChange:
    """A change made by ``RedisQueues.change`` (the contract's ``commit`` takes any ``Change``:
    one from another implementation is a programming error)."""
    if not isinstance(change, RedisChange):
        raise TypeError(f"a {type(change).__name__} cannot be committed to Redis")
    return change


class ItemIds:
    """Queue item ids, taken from Redis in blocks: one INCRBY per BLOCK ids instead of one per
    message. A process that stops leaves its unused ids unused (gaps are harmless)."""

    BLOCK = 200

    def __init__(self) -> None:
        self._pid = -1
        self._next = self._end = 0
        self._lock = threading.Lock()

    def _have(self, count: int) -> list[str] | None:
        if self._pid != os.getpid():  # a forked child must not reuse its parent's block
            self._pid, self._next, self._end = os.getpid(), 0, 0
        if self._end - self._next < count:
            return None
        out = [str(i) for i in range(self._next, self._next + count)]
        self._next += count
        return out

    def _refilled(self, last: int, size: int, count: int) -> list[str]:
        """A new block ends at ``last`` (INCRBY's reply); take ``count`` ids from it."""
        self._next, self._end = last + 1 - size, last + 1
        found = self._have(count)
        assert found is not None
        return found

    def take(self, r: redis.Redis, count: int) -> list[str]:
        if count <= 0:
            return []
        with self._lock:
            size = max(count, self.BLOCK)
            return self._have(count) or self._refilled(int(r.incrby(keys.SEQ_ITEM, size)), size, count)

    async def take_async(self, r: redis.asyncio.Redis, count: int) -> list[str]:
        # (one event loop: no lock needed between awaits here)
        size = max(count, self.BLOCK)
        return self._have(count) or self._refilled(int(await r.incrby(keys.SEQ_ITEM, size)), size, count)


item_ids = ItemIds()


def _no_writes() -> float:
    raise RuntimeError("a reading RedisQueues writes no tracking records")


class RedisQueues:
    """Every queue of the organization, in one Redis database."""

    def __init__(self, r: redis.Redis, drains: DrainMessages | None, retention: Callable[[], float]) -> None:
        self.r = r
        self._drains = drains
        self._retention = retention
        self._celery_queues: dict[str, str] = {}
        self._kinds: dict[str, QueueKind] = {}

    @classmethod
    def reader(cls, r: redis.Redis) -> RedisQueues:
        """For reading only (the Queue Viewer's rows, metrics): it cannot kick a queue."""
        return cls(r, None, _no_writes)

    @property
    def drains(self) -> DrainMessages:
        if self._drains is None:
            raise RuntimeError("a reading RedisQueues cannot queue drain tasks")
        return self._drains

    @property
    def retention_s(self) -> float:
        return self._retention()

    def change(self) -> RedisChange:
        return RedisChange(self)

    def commit(self, changes: Sequence[Change], *, replicated: bool = False) -> list[Committed]:
        own = [_own(c) for c in changes]
        results = run_all(self.r, [c.txn for c in own], replicated=replicated)
        return [c.committed(res) for c, res in zip(own, results, strict=True)]

    def new_item_ids(self, count: int) -> list[str]:
        return item_ids.take(self.r, count)

    # a queue's Celery queue and kind never change, so each is read once per process
    def remember_queue(self, spec: QueueSpec) -> None:
        self._celery_queues[spec.identity] = spec.celery_queue
        self._kinds[spec.identity] = spec.kind

    def kind_of(self, identity: str) -> QueueKind:
        found = self._kinds.get(identity)
        if found is None:
            raw = self.r.hgetall(keys.queue(identity))
            found = self._kinds[identity] = _kind_of(text_map(raw))
        return found

    def celery_queue_of(self, identity: str) -> str:
        found = self._celery_queues.get(identity)
        if found is None:
            found = self._celery_queues[identity] = text(self.r.hget(keys.queue(identity), "route"))
        return found

    # leases

    def claim(self, queue: str, *, worker: Worker, n: int, lease_ms: int, cap: int, token: str
              ) -> Claimed | None:
        reply = script(self.r, "claim")(
            keys=[keys.queue(queue), keys.ready(queue), keys.conns(queue), keys.INFLIGHT, keys.kick(queue)],
            args=[now_ms(), n, lease_ms, token, worker.hub, cap, ITEM_PREFIX, MSG_PREFIX, DrainMessages.ttl_ms,
                  worker.pid],
        )
        if reply == [b"!"]:
            return None
        remaining, flat_items, flat_msgs = reply
        items = [Item.load(text(flat_items[i]), flat_text_map(flat_items[i + 1]))
                 for i in range(0, len(flat_items), 2)]
        messages = {}
        for i in range(0, len(flat_msgs), 2):
            if flat_msgs[i + 1]:
                msg_id = text(flat_msgs[i])
                messages[msg_id] = Message.load(msg_id, flat_text_map(flat_msgs[i + 1]))
        return Claimed(items, messages, number(remaining))

    def renew(self, queue: str, token: str, item_ids: list[str], lease_ms: int) -> list[str]:
        reply = script(self.r, "renew")(keys=[keys.conns(queue), keys.INFLIGHT],
                                        args=[now_ms() + lease_ms, token, ITEM_PREFIX, *item_ids])
        return texts(reply)

    def release(self, queue: str, token: str) -> None:
        self.r.zrem(keys.conns(queue), token)

    def done_draining(self, queue: str) -> bool:
        """The drain found the queue empty: remove the kick marker; True if mail arrived in
        between (the caller then kicks again, so that nothing is stranded)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(keys.kick(queue))
        pipe.llen(keys.ready(queue))
        return bool(pipe.execute()[1])

    # reading

    def queues(self, identities: list[str] | None = None) -> list[QueueInfo]:
        r = self.r
        names = identities if identities is not None else texts(r.zrange(keys.QUEUES, 0, -1))
        now = now_ms()
        pipe = r.pipeline(transaction=False)
        for q in names:
            pipe.hgetall(keys.queue(q))
            pipe.zcard(keys.queue_members(q))
            pipe.llen(keys.ready(q))
            pipe.zcount(keys.conns(q), now, "+inf")
        replies = pipe.execute() if names else []
        out = []
        for i, q in enumerate(names):
            data, count, ready, conns = replies[4 * i : 4 * i + 4]
            if not data:
                continue
            d = text_map(data)
            suspended = d.get("suspended") == "1"
            next_retry = int(d.get("next_retry", 0) or 0)
            self._celery_queues.setdefault(q, d.get("route", ""))
            out.append(QueueInfo(
                identity=q, site=d.get("site", ""), kind=_kind_of(d), delivery_type=d.get("type", ""),
                next_hop=d.get("next_hop", ""), status=queue_status(suspended, next_retry, conns, now),
                message_count=count, ready=ready, last_error=d.get("last_error", ""),
                last_retry=int(d.get("last_retry", 0) or 0), next_retry=next_retry if next_retry > now else 0,
                failures=int(d.get("failures", 0) or 0), connections=conns, celery_queue=d.get("route", ""),
                connector=d.get("connector", ""), created=int(d.get("created", 0) or 0), suspended=suspended,
            ))
        return out

    def members(self, queue: str, limit: int = -1) -> list[str]:
        end = -1 if limit < 0 else limit - 1
        return texts(self.r.zrange(keys.queue_members(queue), 0, end))

    def items(self, ids: list[str]) -> list[Item]:
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for item_id in ids:
            pipe.hgetall(keys.item(item_id))
        return [Item.load(i, text_map(d)) for i, d in zip(ids, pipe.execute(), strict=True) if d]

    def items_of(self, msg_id: str) -> list[Item]:
        return self.items(sorted(texts(self.r.smembers(keys.msg_items(msg_id))), key=int))

    def messages(self, ids: list[str]) -> dict[str, Message]:
        unique = list(dict.fromkeys(ids))
        if not unique:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for msg_id in unique:
            pipe.hgetall(keys.msg(msg_id))
        return {m: Message.load(m, text_map(d)) for m, d in zip(unique, pipe.execute(), strict=True) if d}

    def bodies(self, ids: list[str]) -> dict[str, bytes]:
        unique = list(dict.fromkeys(ids))
        values = self.r.mget([keys.body(m) for m in unique]) if unique else []
        return {m: bytes(v) for m, v in zip(unique, values, strict=True) if isinstance(v, bytes)}

    def known(self, dedup: str) -> str | None:
        # (an Outbox item picked up by a hub of the version before the key moved: read-only)
        found, legacy = self.r.mget([keys.dedup(dedup), keys.legacy_pickup(dedup)])
        return text_or_none(found if found is not None else legacy)

    def request_result(self, item_id: str) -> str | None:
        return text_or_none(self.r.get(keys.request_result(item_id)))

    # the sweeper's schedules

    def _due(self, schedule: str, now: int, limit: int) -> list[str]:
        return texts(self.r.zrangebyscore(schedule, "-inf", now, start=0, num=limit))

    def _loaded(self, schedule: str, ids: list[str], field: str, value: str) -> list[Item]:
        """The items of ``ids``; entries whose item is gone or no longer ``field == value``
        leave the schedule (atomically: an item that re-entered it meanwhile stays)."""
        items = self.items(ids)
        stale = [i for i in ids if i not in {it.id for it in items}]
        stale += [it.id for it in items if getattr(it, field) != value]
        if stale:
            self.commit([self.change().drop_unless(i, field, value, schedule) for i in stale])
        return [it for it in items if getattr(it, field) == value]

    def expired_leases(self, now: int, limit: int) -> list[Item]:
        return self._loaded(keys.INFLIGHT, self._due(keys.INFLIGHT, now, limit), "status", ItemStatus.ACTIVE.value)

    def due_retries(self, now: int, limit: int) -> list[Item]:
        return self._loaded(keys.RETRY, self._due(keys.RETRY, now, limit), "status", ItemStatus.RETRY.value)

    def expiring(self, now: int, limit: int) -> list[Item]:
        return self.items(self._due(keys.EXPIRY, now, limit))

    def due_delay_reports(self, now: int, limit: int) -> list[str]:
        return self._due(keys.DELAY, now, limit)

    def stalled_queues(self, now: int) -> list[QueueInfo]:
        infos = [q for q in self.queues() if q.ready and not q.suspended and not q.next_retry
                 and not q.connections and q.kind in DRAINED]
        if not infos:
            return []
        pipe = self.r.pipeline(transaction=False)
        for q in infos:
            pipe.exists(keys.kick(q.identity))
        return [q for q, pending in zip(infos, pipe.execute(), strict=True) if not pending]

