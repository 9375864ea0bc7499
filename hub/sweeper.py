"""The sweeper: every hub runs it, one at a time by lease (DESIGN §2.3).

Each pass:
- returns items whose lease expired (their worker died) to the front of their queue,
  counting the crash; at ``poison_threshold`` crashes the item goes to the Poison queue;
- moves items whose own retry time has come back into their queue;
- expires messages past ``message_expiration_timeout`` with an NDR (4.4.7);
- sends one delay DSN per message past ``delay_notification_timeout``;
- re-sends drain tasks for queues that have ready mail but no drain pending or running
  (a lost Celery message, or a queue whose Retry time has come);
- re-notifies Outbox items of the site whose pickup was not acknowledged in time.
Killing the sweeper's hub loses nothing: the lease expires and another hub takes over.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter

from mailyard import keys, nodes, tracking
from mailyard.broker import KICK_TTL_MS
from mailyard.hub import dsn, pressure
from mailyard.hub.bounce import queue_report, wants_report
from mailyard.hub.delivery import poison_or_return
from mailyard.hub.node import Node
from mailyard.hub.queues import (
    Item,
    allocate_items,
    ensure_site_queues,
    forget_item,
    load_bodies,
    load_items,
    load_messages,
)
from mailyard.nodes import now_ms
from mailyard.scripts import script
from mailyard.submission.service import Notifier
from mailyard.tracking import Event, Record
from mailyard.txn import Kick, Txn

log = logging.getLogger("mailyard.hub.sweeper")

LEASE_MS = 10_000
BATCH = 200


def _last(reply: str, last_error: str) -> str:
    return f"{reply}; last error: {last_error or 'none'}"


def worker_crashed(item: Item, hub: nodes.HubInfo | None, timeout: float, now: int) -> tuple[bool, str]:
    """Did the process that held ``item`` die (a crash, counted towards Poison), or did its
    lease merely run out (a stall, a partition from Redis: not the message's fault)?

    A crash: the hub restarted since it took the item, or it is alive but the worker process
    that held the item is gone (a pool child killed). A hub that is silent now may be cut
    off from Redis rather than dead; its items go back without counting, and if it really
    died, it counts when it restarts (as Exchange counts after its transport restarts)."""
    if hub is None:
        return False, f"lease expired (hub {item.hub or '?'} unknown)"
    if hub.started > item.leased:
        return True, f"hub {hub.name} restarted while it held the message"
    if hub.alive(timeout, now) and item.pid and hub.pids and item.pid not in hub.pids:
        return True, f"worker process {item.pid} of hub {hub.name} died while it held the message"
    return False, f"lease expired (hub {hub.name} stalled or cut off)"


class Sweeper:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._notifier: Notifier | None = None

    def holds_lease(self) -> bool:
        return bool(script(self.node.r, "lease")(keys=[keys.SWEEPER], args=[self.node.name, LEASE_MS]))

    def sweep(self) -> dict[str, int]:
        """One pass (if this hub holds the sweeper lease); returns what it did."""
        if not self.holds_lease():
            return {}
        pressure.update(self.node.r, self.node.orgs.org)
        done = {
            "reclaimed": self.reclaim_expired_leases(),
            "retried": self.promote_due_retries(),
            "expired": self.expire(),
            "delayed": self.delay_notifications(),
            "kicked": self.kick_stalled_queues(),
            "renotified": self.renotify_outbox(),
            "rerouted": self.reroute_unreachable(),
        }
        return {k: v for k, v in done.items() if v}

    def reclaim_expired_leases(self) -> int:
        r = self.node.r
        now = now_ms()
        ids = [i.decode() for i in r.zrangebyscore(keys.INFLIGHT, "-inf", now, start=0, num=BATCH)]
        items = load_items(r, ids)
        hubs = {h.name: h for h in nodes.hubs(r)} if items else {}
        timeout = self.node.settings.hub_heartbeat_timeout
        shared = Counter(item.lease for item in items)
        txns = []
        for item in items:
            crashed, why = worker_crashed(item, hubs.get(item.hub), timeout, now)
            txn = Txn().guard_eq(keys.item(item.id), "lease", item.lease)
            if crashed and shared[item.lease] > 1:
                # The worker died on a batch: which message killed it is not known. None of
                # them counts; each is taken alone from now on, so a second crash is attributed.
                txn.hset(keys.item(item.id), {"suspect": 1})
                crashed, why = False, why + " (on a batch: each message will be tried alone)"
            poison_or_return(self.node, txn, item, why, now, crashed=crashed)
            txn.kick(item.queue, self._route(item.queue), KICK_TTL_MS)
            txns.append(txn)
        if missing := set(ids) - {i.id for i in items}:
            r.zrem(keys.INFLIGHT, *missing)  # items removed meanwhile
        return sum(res.ok for res in self.node.commit_all(txns))

    def _route(self, queue: str) -> str:
        route = self.node.r.hget(keys.queue(queue), "route")
        return route.decode() if route else ""

    def promote_due_retries(self) -> int:
        r = self.node.r
        ids = [i.decode() for i in r.zrangebyscore(keys.RETRY, "-inf", now_ms(), start=0, num=BATCH)]
        txns = []
        for item in load_items(r, ids):
            txn = Txn().guard_eq(keys.item(item.id), "status", "Retry")
            txn.op("ZREM", keys.RETRY, item.id)
            txn.hset(keys.item(item.id), {"status": "Ready"})
            txn.op("RPUSH", keys.ready(item.queue), item.id)
            txn.kick(item.queue, self._route(item.queue), KICK_TTL_MS)
            txns.append(txn)
        results = self.node.commit_all(txns)
        stale = [i for i, res in zip(ids, results, strict=False) if not res.ok]
        if len(results) < len(ids) or stale:
            # Items that vanished or changed state no longer belong in the schedule.
            live = {i.id: i for i in load_items(r, ids)}
            drop = [i for i in ids if i not in live or live[i].status != "Retry"]
            if drop:
                r.zrem(keys.RETRY, *drop)
        return sum(res.ok for res in results)

    def expire(self) -> int:
        r = self.node.r
        now = now_ms()
        ids = [i.decode() for i in r.zrangebyscore(keys.EXPIRY, "-inf", now, start=0, num=BATCH)]
        items = [i for i in load_items(r, ids)
                 if i.status != "Active" and not i.queue.endswith("\\Poison")]
        if not items:
            return 0
        messages = load_messages(r, [i.msg for i in items])
        reporting = [i.msg for i in items if i.msg in messages and wants_report(messages[i.msg])]
        bodies = load_bodies(r, reporting)
        report_ids = iter(allocate_items(r, len(reporting)))
        txns = []
        for item in items:
            msg = messages.get(item.msg)
            txn = Txn().guard_eq(keys.item(item.id), "status", item.status)
            forget_item(txn, item)
            if msg is not None:
                failures = [
                    dsn.Failure(rc.address, _last(dsn.EXPIRED, rc.last_error or item.last_error), rc.original)
                    for rc in item.recipients
                ]
                tracking.add(
                    txn,
                    Record(Event.FAIL, source="ROUTING", server=self.node.name, internal_id=msg.id,
                           message_id=msg.message_id, recipients=[f.recipient for f in failures],
                           recipient_status=[f.diagnostic for f in failures], sender=msg.sender,
                           subject=msg.subject, size=msg.size, queue=item.queue),
                    self.node.settings.message_tracking_log_max_age, now,
                )
                if msg.id in bodies:
                    queue_report(self.node, txn, msg, bodies[msg.id], failures,
                                 item_id=next(report_ids), now=now)
            txns.append(txn)
        return sum(res.ok for res in self.node.commit_all(txns))

    def delay_notifications(self) -> int:
        r = self.node.r
        now = now_ms()
        due = [m.decode() for m in r.zrangebyscore(keys.DELAY, "-inf", now, start=0, num=BATCH)]
        if not due:
            return 0
        messages = load_messages(r, due)
        sent = 0
        for msg_id in due:
            msg = messages.get(msg_id)
            items: list[Item] = []
            if msg is not None:
                item_ids = [i.decode() for i in r.smembers(keys.msg_items(msg_id))]
                items = [i for i in load_items(r, item_ids) if not i.queue.endswith("\\Submission")]
            pending = [(rc, it) for it in items for rc in it.recipients]
            txn = Txn().op("ZREM", keys.DELAY, msg_id)
            if msg is not None and pending and wants_report(msg) and self.node.settings.delay_dsn_enabled:
                body = load_bodies(r, [msg_id]).get(msg_id, b"")
                failures = [
                    dsn.Failure(rc.address, _last(dsn.DELAYED, rc.last_error or it.last_error), rc.original)
                    for rc, it in pending
                ]
                (report_id,) = allocate_items(r, 1)
                txn.guard_exists(keys.msg(msg_id)).guard_no_field(keys.msg(msg_id), "delay_dsn_sent")
                txn.op("HSET", keys.msg(msg_id), "delay_dsn_sent", now)
                queue_report(self.node, txn, msg, body, failures, item_id=report_id, delayed=True, now=now)
                sent += 1
            self.node.commit(txn)
        return sent

    def kick_stalled_queues(self) -> int:
        flat = script(self.node.r, "stalled")(keys=[keys.QUEUES], args=[now_ms(), KICK_TTL_MS, keys.P])
        kicks = [Kick(flat[i].decode(), flat[i + 1].decode()) for i in range(0, len(flat), 2)]
        self.node.kick(kicks)
        return len(kicks)

    def reroute_unreachable(self) -> int:
        """After ``org apply``, messages in the Unreachable queues get another chance: a new
        connector or mailbox may route them now (not while the queue is suspended)."""
        from mailyard.hub.admin import resubmit_queue

        version = int(self.node.r.get(keys.ORG_VERSION) or 0)
        seen = self.node.r.getset(keys.REROUTED_VERSION, version)
        if seen is None or int(seen) == version:
            return 0
        moved = 0
        for raw in self.node.r.zrange(keys.QUEUES, 0, -1):
            queue = raw.decode()
            if queue.endswith("\\Unreachable") and self.node.r.hget(keys.queue(queue), "suspended") != b"1":
                moved += resubmit_queue(self.node, queue)
        return moved

    def renotify_outbox(self) -> int:
        if self._notifier is None:
            self._notifier = Notifier(self.node.r, self.node.app, self.node.orgs)
        directory = self.node.orgs.get()
        return sum(
            self._notifier.renotify_due(server) for server in directory.servers_in_site(self.node.site)
        )


def worker_pids() -> list[int]:
    """This process and its children (Celery's pool): which processes hold leases now."""
    pids = [os.getpid()]
    try:
        for task in os.listdir(f"/proc/{os.getpid()}/task"):
            with open(f"/proc/{os.getpid()}/task/{task}/children") as fh:
                pids += [int(p) for p in fh.read().split()]
    except OSError:  # not Linux: crash detection falls back to restarts
        pass
    return pids


class Services:
    """The hub's background threads: heartbeat (1 s) and sweeper (``sweep_interval``)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = now_ms()

    def start(self) -> None:
        try:
            ensure_site_queues(self.node.r, self.node.site, self.node.orgs.get().servers_in_site(self.node.site))
        except Exception as exc:  # Redis not there yet: the queues appear with the first mail
            log.warning("could not create the site's queues: %s", exc)
        for target, name in ((self._heartbeat, "heartbeat"), (self._sweep, "sweeper")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        from mailyard.nodes import hub_gone

        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        try:
            hub_gone(self.node.r, self.node.name)
            if self.node.r.get(keys.SWEEPER) == self.node.name.encode():
                self.node.r.delete(keys.SWEEPER)
        except Exception:
            pass

    def _heartbeat(self) -> None:
        import mailbox  # which module this process resolves (DESIGN §3: never a shadow)

        from mailyard.nodes import hub_heartbeat

        while not self._stop.is_set():
            try:
                extra = {"stdlib_mailbox": str(mailbox.__file__), "pids": json.dumps(worker_pids())}
                hub_heartbeat(self.node.r, self.node.name, self.node.site, started=self._started,
                              extra=extra)
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            self._stop.wait(1.0)

    def _sweep(self) -> None:
        sweeper = Sweeper(self.node)
        while not self._stop.is_set():
            interval = 1.0
            try:
                interval = self.node.settings.sweep_interval
                if done := sweeper.sweep():
                    log.info("sweeper: %s", ", ".join(f"{k} {v}" for k, v in done.items()))
            except Exception:
                log.exception("sweeper pass failed; trying again")
            self._stop.wait(interval)
