"""Mail queues as objects in Redis: the Submission queue, one delivery queue per next hop,
the Unreachable and Poison queues (DESIGN §2.6).

A queue's identity is ``<site>\\<next hop>``; any hub of the site works on it. A queue
holds items (one message for some recipients); ``claim`` hands a worker up to N ready items
under a lease, and every later change of an item is a guarded ``Txn`` that checks the lease,
so a worker that lost its lease (it stalled, or was presumed dead) changes nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum

import redis
import redis.asyncio

from mailyard import keys
from mailyard.broker import KICK_TTL_MS, site_queue
from mailyard.nodes import now_ms
from mailyard.scripts import script
from mailyard.txn import Txn

ITEM_PREFIX = keys.item("")


class DeliveryType(StrEnum):
    UNDEFINED = "Undefined"  # the Submission queue (next hop not known yet) and Poison
    MAPI = "MapiDelivery"
    REMOTE_SITE = "SmtpRelayToRemoteAdSite"
    DNS = "DnsConnectorDelivery"
    SMART_HOST = "SmartHostConnectorDelivery"
    UNREACHABLE = "Unreachable"


class Status(StrEnum):
    ACTIVE = "Active"
    READY = "Ready"
    RETRY = "Retry"
    SUSPENDED = "Suspended"


SUBMISSION = "Submission"
UNREACHABLE = "Unreachable"
POISON = "Poison"


@dataclass(frozen=True)
class QueueSpec:
    """What a queue is: created on first use, never changed afterwards."""

    identity: str
    site: str
    delivery_type: DeliveryType
    next_hop: str
    route: str  # the Celery queue its drain tasks go to
    connector: str = ""

    def ensure(self, txn: Txn) -> None:
        """An operation that creates the queue if it does not exist yet."""
        txn.op("@queue", keys.queue(self.identity), keys.QUEUES, self.identity, self.site,
               self.delivery_type.value, self.next_hop, self.route, self.connector, now_ms())


def submission_queue(site: str) -> QueueSpec:
    return QueueSpec(f"{site}\\{SUBMISSION}", site, DeliveryType.UNDEFINED, SUBMISSION, site_queue(site))


def unreachable_queue(site: str) -> QueueSpec:
    return QueueSpec(
        f"{site}\\{UNREACHABLE}", site, DeliveryType.UNREACHABLE, "Unreachable Domain", site_queue(site)
    )


def poison_queue(site: str) -> QueueSpec:
    return QueueSpec(f"{site}\\{POISON}", site, DeliveryType.UNDEFINED, POISON, site_queue(site))


def mapi_queue(site: str, server: str) -> QueueSpec:
    return QueueSpec(f"{site}\\{server}", site, DeliveryType.MAPI, server, site_queue(site))


def remote_site_queue(site: str, target: str) -> QueueSpec:
    return QueueSpec(f"{site}\\{target}", site, DeliveryType.REMOTE_SITE, target, site_queue(site))


def ensure_site_queues(r: redis.Redis, site: str, servers: list[str]) -> None:
    """Create a site's standing queues: Submission and Unreachable (Exchange always shows
    them) and one MapiDelivery queue per mailbox server, so they can be seen and suspended
    before any mail has passed."""
    txn = Txn()
    for spec in (submission_queue(site), unreachable_queue(site), *(mapi_queue(site, s) for s in servers)):
        spec.ensure(txn)
    txn.run(r)


# region: records


@dataclass
class Recipient:
    address: str
    original: str = ""  # ORCPT: the address the sender used, or the group it came from
    kind: str = ""
    status: str = "Ready"
    last_error: str = ""
    retries: int = 0

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"address": self.address}
        for name in ("original", "kind", "status", "last_error", "retries"):
            value = getattr(self, name)
            if value not in ("", 0):
                out[name] = value
        return out


@dataclass
class Message:
    """The envelope and summary of one message (``my:msg:<id>``)."""

    id: str
    sender: str  # envelope MAIL FROM; "" is the null sender <>
    message_id: str = ""
    subject: str = ""
    size: int = 0
    received: int = 0  # ms
    expires: int = 0  # ms
    source: str = ""  # STOREDRIVER, SMTP, DSN
    origin: str = ""  # outbox item reference, or the SMTP client
    site: str = ""  # site of the hub that accepted it
    hub: str = ""
    dsn: str = ""  # "" for ordinary mail; "ndr" or "delay" for notifications we generated
    client: str = ""

    def fields(self) -> dict[str, str | int]:
        """What is stored in ``my:msg:<id>`` (empty fields left out: they read back as empty)."""
        return {k: v for k, v in self.__dict__.items() if k != "id" and v not in ("", 0)}

    @classmethod
    def load(cls, msg_id: str, data: dict[bytes, bytes]) -> Message:
        d = {k.decode(): v.decode("utf-8", "replace") for k, v in data.items()}
        return cls(
            id=msg_id,
            sender=d.get("sender", ""),
            message_id=d.get("message_id", ""),
            subject=d.get("subject", ""),
            size=int(d.get("size", 0) or 0),
            received=int(d.get("received", 0) or 0),
            expires=int(d.get("expires", 0) or 0),
            source=d.get("source", ""),
            origin=d.get("origin", ""),
            site=d.get("site", ""),
            hub=d.get("hub", ""),
            dsn=d.get("dsn", ""),
            client=d.get("client", ""),
        )


@dataclass
class Item:
    """One message in one queue (``my:item:<id>``), with its recipients' state."""

    id: str
    msg: str
    queue: str
    recipients: list[Recipient] = field(default_factory=list)
    status: str = "Ready"
    retries: int = 0
    last_error: str = ""
    crashes: int = 0
    lease: str = ""
    hub: str = ""
    enqueued: int = 0
    next_retry: int = 0
    pending: str = ""  # an admin action waiting for the delivery in progress to end
    remove_ndr: bool = True  # with PendingRemove: send the NDR
    leased: int = 0  # when the lease was taken, ms
    pid: int = 0  # the worker process holding the lease

    @classmethod
    def load(cls, item_id: str, data: dict[bytes, bytes]) -> Item:
        d = {k.decode(): v.decode("utf-8", "replace") for k, v in data.items()}
        return cls(
            id=item_id,
            msg=d.get("msg", ""),
            queue=d.get("queue", ""),
            recipients=[Recipient(**r) for r in json.loads(d.get("rcpts", "[]"))],
            status=d.get("status", ""),
            retries=int(d.get("retries", 0) or 0),
            last_error=d.get("last_error", ""),
            crashes=int(d.get("crashes", 0) or 0),
            lease=d.get("lease", ""),
            hub=d.get("hub", ""),
            enqueued=int(d.get("enqueued", 0) or 0),
            next_retry=int(d.get("next_retry", 0) or 0),
            pending=d.get("pending", ""),
            remove_ndr=d.get("remove_ndr", "1") != "0",
            leased=int(d.get("leased", 0) or 0),
            pid=int(d.get("pid", 0) or 0),
        )


def rcpts_json(recipients: list[Recipient]) -> str:
    return json.dumps([r.as_json() for r in recipients], separators=(",", ":"))


# endregion

# region: writing


def new_message_id() -> str:
    """A message id unique across sites and Redis servers: time-ordered, then random."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(5)}"


class _ItemIds:
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
        with self._lock:
            size = max(count, self.BLOCK)
            return self._have(count) or self._refilled(int(r.incrby(keys.SEQ_ITEM, size)), size, count)

    async def take_async(self, r: redis.asyncio.Redis, count: int) -> list[str]:
        # (one event loop: no lock needed between awaits here)
        size = max(count, self.BLOCK)
        return self._have(count) or self._refilled(int(await r.incrby(keys.SEQ_ITEM, size)), size, count)


item_ids = _ItemIds()


def allocate_items(r: redis.Redis, count: int) -> list[str]:
    return item_ids.take(r, count) if count > 0 else []


def create_message(txn: Txn, msg: Message, body: bytes, *, refs: int, delay_dsn_at: int = 0) -> None:
    """Store a new message held by ``refs`` items; schedule its delay DSN if it can get one."""
    txn.hset(keys.msg(msg.id), {**msg.fields(), "refs": refs})
    txn.op("SET", keys.body(msg.id), body)
    if delay_dsn_at and msg.sender and not msg.dsn:
        txn.op("ZADD", keys.DELAY, delay_dsn_at, msg.id)


def enqueue(
    txn: Txn,
    spec: QueueSpec,
    item_id: str,
    msg: Message,
    recipients: list[Recipient],
    *,
    now: int,
    status: str = "Ready",
    ready: bool = True,
) -> None:
    """Put a new item into a queue (creating the queue), and ask for a drain if needed."""
    spec.ensure(txn)
    txn.hset(
        keys.item(item_id),
        {
            "msg": msg.id,
            "queue": spec.identity,
            "rcpts": rcpts_json(recipients),
            "status": status,
            "enqueued": now,
        },
    )
    txn.op("ZADD", keys.queue_members(spec.identity), now, item_id)
    txn.op("SADD", keys.msg_items(msg.id), item_id)
    if msg.expires and spec.identity.rpartition("\\")[2] != POISON:
        txn.op("ZADD", keys.EXPIRY, msg.expires, item_id)
    if ready:
        txn.op("RPUSH", keys.ready(spec.identity), item_id)
        txn.kick(spec.identity, spec.route, KICK_TTL_MS)


def forget_item(txn: Txn, item: Item, *, claimed: bool = False) -> None:
    """Operations that take an item out of its queue and every schedule, for good.

    ``claimed``: the caller holds the item from ``claim``, which took it off the ready list,
    so the list is not searched (LREM is linear in the backlog: with 100,000 ready items it
    cost 2.3 ms of Redis per delivered message). Should a stale id remain there all the
    same (a lease that expired and was put back), ``claim`` skips ids whose item is gone."""
    txn.op("DEL", keys.item(item.id))
    txn.op("ZREM", keys.queue_members(item.queue), item.id)
    if not claimed:
        txn.op("LREM", keys.ready(item.queue), 0, item.id)
    for index in (keys.INFLIGHT, keys.RETRY, keys.EXPIRY):
        txn.op("ZREM", index, item.id)
    txn.op("SREM", keys.msg_items(item.msg), item.id)
    txn.decref(item.msg)


# endregion

# region: reading


def load_items(r: redis.Redis, ids: list[str]) -> list[Item]:
    pipe = r.pipeline(transaction=False)
    for item_id in ids:
        pipe.hgetall(keys.item(item_id))
    return [Item.load(i, d) for i, d in zip(ids, pipe.execute(), strict=True) if d]


def load_messages(r: redis.Redis, msg_ids: list[str]) -> dict[str, Message]:
    unique = list(dict.fromkeys(msg_ids))
    pipe = r.pipeline(transaction=False)
    for msg_id in unique:
        pipe.hgetall(keys.msg(msg_id))
    return {m: Message.load(m, d) for m, d in zip(unique, pipe.execute(), strict=True) if d}


def load_bodies(r: redis.Redis, msg_ids: list[str]) -> dict[str, bytes]:
    unique = list(dict.fromkeys(msg_ids))
    values = r.mget([keys.body(m) for m in unique]) if unique else []
    return {m: v for m, v in zip(unique, values, strict=True) if v is not None}


@dataclass
class QueueInfo:
    """A queue as Get-Queue shows it."""

    identity: str
    site: str
    delivery_type: str
    next_hop: str
    status: str
    message_count: int
    ready: int
    last_error: str
    last_retry: int
    next_retry: int
    failures: int
    connections: int
    route: str
    connector: str
    created: int
    suspended: bool

    def as_dict(self) -> dict[str, object]:
        return {
            "identity": self.identity,
            "delivery_type": self.delivery_type,
            "status": self.status,
            "message_count": self.message_count,
            "next_hop_domain": self.next_hop,
            "last_error": self.last_error,
            "last_retry_time": _iso(self.last_retry),
            "next_retry_time": _iso(self.next_retry),
            "site": self.site,
            "connections": self.connections,
            "connector": self.connector,
        }


def _iso(ms: int) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def queue_status(suspended: bool, next_retry: int, connections: int, now: int) -> Status:
    if suspended:
        return Status.SUSPENDED
    if next_retry > now:
        return Status.RETRY
    if connections:
        return Status.ACTIVE
    return Status.READY


def list_queues(r: redis.Redis, identities: list[str] | None = None) -> list[QueueInfo]:
    names = identities if identities is not None else [q.decode() for q in r.zrange(keys.QUEUES, 0, -1)]
    now = now_ms()
    pipe = r.pipeline(transaction=False)
    for q in names:
        pipe.hgetall(keys.queue(q))
        pipe.zcard(keys.queue_members(q))
        pipe.llen(keys.ready(q))
        pipe.zcount(keys.conns(q), now, "+inf")
    replies = pipe.execute()
    out = []
    for i, q in enumerate(names):
        data, count, ready, conns = replies[4 * i : 4 * i + 4]
        if not data:
            continue
        d = {k.decode(): v.decode() for k, v in data.items()}
        suspended = d.get("suspended") == "1"
        next_retry = int(d.get("next_retry", 0) or 0)
        out.append(
            QueueInfo(
                identity=q,
                site=d.get("site", ""),
                delivery_type=d.get("type", ""),
                next_hop=d.get("next_hop", ""),
                status=queue_status(suspended, next_retry, conns, now).value,
                message_count=count,
                ready=ready,
                last_error=d.get("last_error", ""),
                last_retry=int(d.get("last_retry", 0) or 0),
                next_retry=next_retry if next_retry > now else 0,
                failures=int(d.get("failures", 0) or 0),
                connections=conns,
                route=d.get("route", ""),
                connector=d.get("connector", ""),
                created=int(d.get("created", 0) or 0),
                suspended=suspended,
            )
        )
    return out


# endregion

# region: leases


@dataclass
class Claim:
    queue: str
    token: str
    items: list[Item]


@dataclass
class Claimed:
    """What ``claim`` took: the items, their messages, and how many are still waiting."""

    items: list[Item]
    messages: dict[str, Message]
    remaining: int


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def claim(
    r: redis.Redis, queue: str, *, hub: str, n: int, lease_ms: int, cap: int, token: str
) -> Claimed | None:
    """Take up to ``n`` ready items of ``queue`` under ``token``'s lease, with their messages,
    in one round trip (core/lua/claim.lua); None when the queue may not be taken from now
    (suspended, in Retry, at its cap)."""
    reply = script(r, "claim")(
        keys=[keys.queue(queue), keys.ready(queue), keys.conns(queue), keys.INFLIGHT, keys.kick(queue)],
        args=[now_ms(), n, lease_ms, token, hub, cap, ITEM_PREFIX, keys.msg(""), KICK_TTL_MS, os.getpid()],
    )
    if reply == [b"!"]:
        return None
    remaining, flat_items, flat_msgs = reply
    items = [Item.load(flat_items[i].decode(), _pairs(flat_items[i + 1])) for i in range(0, len(flat_items), 2)]
    messages = {}
    for i in range(0, len(flat_msgs), 2):
        if flat_msgs[i + 1]:
            msg_id = flat_msgs[i].decode()
            messages[msg_id] = Message.load(msg_id, _pairs(flat_msgs[i + 1]))
    return Claimed(items, messages, int(remaining))


def release(r: redis.Redis, queue: str, token: str) -> None:
    """The worker is done with the queue: its connection slot is free again."""
    r.zrem(keys.conns(queue), token)


def renew(r: redis.Redis, queue: str, token: str, item_ids: list[str], lease_ms: int) -> None:
    until = now_ms() + lease_ms
    pipe = r.pipeline(transaction=True)
    pipe.zadd(keys.conns(queue), {token: until}, xx=True)
    if item_ids:
        pipe.zadd(keys.INFLIGHT, {i: until for i in item_ids}, xx=True)
    pipe.execute()


# endregion
