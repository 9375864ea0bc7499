"""Wait until a site is quiet: every delivery and redelivery is over, nothing more can arrive.

An exactly-once verdict counts copies only then. Counted at first arrival, a copy that a
redelivery is about to add (a lease that expires, a retry that comes due, a pickup that is
re-notified) is missed, and broken deduplication passes.

The site is *quiet* when, in one atomic reading of Redis (MULTI/EXEC):

- no item is in flight (``my:inflight`` is empty: no lease held, none expired and waiting to
  be returned by the sweeper);
- no item waits for a retry of its own in a queue that could still deliver it (``my:retry``);
- no queue that could still deliver has ready items (``my:ready:<q>``), Submission queues
  included, and no drain lease is still running on one (``my:conns:<q>``);
- no Outbox item waits for a hub to acknowledge its pickup (``my:submit:pending:<server>``);

and it stays so for ``settle`` seconds. A queue that is not going to deliver (suspended,
Unreachable, Poison: they wait for an operator) does not count; what it holds is listed as
*parked*, so that a verdict can say where a missing message went. This module only reads
keys named by :mod:`mailyard.keys`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import redis

from mailyard import keys
from mailyard.hub.records import ItemStatus
from mailyard.redisconn import scored, text, text_map, texts
from mailyard.testing.waiting import wait_until

SHOW = 8  # entries listed per kind in a description


def _parked(queue: dict[str, str]) -> bool:
    """A queue that is not going to deliver by itself: an operator must act first."""
    kind = (queue.get("kind") or "").lower()
    return (queue.get("suspended") == "1" or queue.get("type") == "Unreachable"
            or queue.get("next_hop") == "Poison" or kind in ("unreachable", "poison"))


@dataclass
class Activity:
    """What is still going on at a site (one consistent reading of Redis)."""

    inflight: dict[str, float] = field(default_factory=dict)  # item -> seconds its lease has left
    retrying: dict[str, tuple[str, float]] = field(default_factory=dict)  # item -> (queue, s until due)
    ready: dict[str, int] = field(default_factory=dict)  # queue -> ready items
    draining: dict[str, int] = field(default_factory=dict)  # queue -> live drain leases
    submissions: dict[str, list[str]] = field(default_factory=dict)  # server -> refs not acknowledged
    parked: dict[str, int] = field(default_factory=dict)  # queue that will not deliver -> its items
    other: list[str] = field(default_factory=list)  # the caller's own findings (an Outbox, ...)

    @property
    def quiet(self) -> bool:
        return not (self.inflight or self.retrying or self.ready or self.draining or self.submissions
                    or self.other)

    def describe(self) -> str:
        def some(entries: Iterable[str]) -> str:
            listed = list(entries)
            more = f", ... ({len(listed) - SHOW} more)" if len(listed) > SHOW else ""
            return ", ".join(listed[:SHOW]) + more

        lines = []
        if self.inflight:
            lines.append(f"{len(self.inflight)} item(s) in flight: "
                         + some(f"{i} (lease {s:+.1f}s)" for i, s in self.inflight.items()))
        if self.retrying:
            lines.append(f"{len(self.retrying)} item(s) waiting for a retry: "
                         + some(f"{i} in {q} (due {s:+.1f}s)" for i, (q, s) in self.retrying.items()))
        if self.ready:
            lines.append("ready items: " + some(f"{q}: {n}" for q, n in self.ready.items()))
        if self.draining:
            lines.append("drain leases still running: " + some(f"{q}: {n}" for q, n in self.draining.items()))
        if self.submissions:
            lines.append("Outbox pickups not acknowledged: "
                         + some(f"{s}: {some(refs)}" for s, refs in self.submissions.items()))
        lines += self.other
        if self.parked:
            lines.append("parked (waiting for an operator): "
                         + some(f"{q}: {n}" for q, n in self.parked.items()))
        return "; ".join(lines) if lines else "quiet"


def activity(r: redis.Redis, *, attempts: int = 5) -> Activity:
    """Read what is still going on, in one MULTI/EXEC.

    The keys to read depend on the queues, servers and retrying items that exist; they are
    guessed from the previous reading and confirmed inside the transaction (a new queue or
    a retry that came due meanwhile: read again)."""
    queues = texts(r.zrange(keys.QUEUES, 0, -1))
    servers = texts(r.zrange(keys.SERVERS, 0, -1))
    retry_ids = texts(r.zrange(keys.RETRY, 0, -1))
    for _ in range(attempts):
        pipe = r.pipeline(transaction=True)
        pipe.time()
        pipe.zrange(keys.QUEUES, 0, -1)
        pipe.zrange(keys.SERVERS, 0, -1)
        pipe.zrange(keys.RETRY, 0, -1, withscores=True)
        pipe.zrange(keys.INFLIGHT, 0, -1, withscores=True)
        for q in queues:
            pipe.hgetall(keys.queue(q))
            pipe.llen(keys.ready(q))
            pipe.zrange(keys.conns(q), 0, -1, withscores=True)
            pipe.zcard(keys.queue_members(q))
        for server in servers:
            pipe.zrange(keys.submit_pending(server), 0, -1)
        for item_id in retry_ids:
            pipe.hmget(keys.item(item_id), "queue", "status")
        replies = pipe.execute()
        (seconds, micros), q_now, s_now, retry, inflight = replies[:5]
        rest = replies[5:]
        retry, inflight = scored(retry), scored(inflight)
        retry_now = [m for m, _ in retry]
        if texts(q_now) != queues or texts(s_now) != servers or sorted(retry_now) != sorted(retry_ids):
            queues, servers, retry_ids = texts(q_now), texts(s_now), retry_now
            continue
        now = seconds * 1000 + micros / 1000
        found = Activity(inflight={m: (score - now) / 1000 for m, score in inflight})
        info: dict[str, dict[str, str]] = {}
        for i, q in enumerate(queues):
            data, ready, conns, members = rest[4 * i: 4 * i + 4]
            info[q] = text_map(data)
            if _parked(info[q]):
                if members:
                    found.parked[q] = members
                continue
            if ready:
                found.ready[q] = ready
            if live := sum(1 for _, until in conns if until > now):
                found.draining[q] = live
        rest = rest[4 * len(queues):]
        for server, refs in zip(servers, rest[:len(servers)], strict=True):
            if refs:
                found.submissions[server] = texts(refs)
        rest = rest[len(servers):]
        due = dict(retry)
        for item_id, (queue, status) in zip(retry_ids, rest, strict=True):
            if queue is None or text(status) != ItemStatus.RETRY:
                continue  # a stale entry (the item is gone or moved on): the sweeper drops it
            q = text(queue)
            if q in info and _parked(info[q]):
                continue
            found.retrying[item_id] = (q, (due[item_id] - now) / 1000)
        return found
    return Activity(other=[f"the queues kept changing during {attempts} readings"])


def wait_quiet(
    r: redis.Redis,
    *,
    timeout: float = 120.0,
    settle: float = 1.0,
    also: Callable[[], Iterable[str]] | None = None,
) -> Activity:
    """Wait until the site is quiet (see the module's documentation) and has stayed quiet
    for ``settle`` seconds; return the last reading (its ``parked`` queues may hold mail).

    ``also`` reports what else is still going on outside Redis, one line each (a non-empty
    Outbox, say); it may raise while a process restarts, which counts as not quiet yet.
    Fails after ``timeout`` seconds with a description of what was still in flight."""
    last = Activity(other=["not read yet"])
    since: list[float] = []  # when the current quiet stretch began

    def quiet() -> bool:
        nonlocal last
        try:
            reading = activity(r)
            if also is not None:
                reading.other += list(also())
        except Exception as exc:  # Redis or a mailbox server restarting: not quiet yet
            reading = Activity(other=[f"could not read: {exc!r}"])
        last = reading
        if not reading.quiet:
            since.clear()
            return False
        if not since:
            since.append(time.monotonic())
        return time.monotonic() - since[0] >= settle

    wait_until(quiet, timeout=timeout, interval=0.1,
               message=lambda: f"the site is not quiet: {last.describe()}")
    return last
