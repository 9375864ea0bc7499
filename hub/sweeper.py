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

import redis

from mailyard import __version__, durability, keys, registry
from mailyard.hub import dsn, flow, pressure
from mailyard.hub.bounce import queue_report
from mailyard.hub.node import Hub, Node
from mailyard.hub.outcomes import stop_processing
from mailyard.hub.queues import QueueKind, standing_queues, submission_queue
from mailyard.hub.records import Item, ItemStatus
from mailyard.processes import living_children
from mailyard.redisconn import number, text
from mailyard.registry import now_ms
from mailyard.scripts import script
from mailyard.submission.service import Notifier
from mailyard.tracking import Event, Record

log = logging.getLogger("mailyard.hub.sweeper")

LEASE_MS = 10_000
BATCH = 200


def _last(reply: str, last_error: str) -> str:
    return f"{reply}; last error: {last_error or 'none'}"


def worker_crashed(item: Item, hub: registry.HubInfo | None, timeout: float, now: int) -> tuple[bool, str]:
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
        self.flow = flow.Recorder(node.r)

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
        try:  # (after the mail's own work: a picture of the flow never holds it up)
            self.flow.tick(now_ms())
        except redis.RedisError as exc:
            log.warning("could not record the mail flow: %s", exc)
        return {k: v for k, v in done.items() if v}

    def reclaim_expired_leases(self) -> int:
        node, queues = self.node, self.node.queues
        now = now_ms()
        items = queues.expired_leases(now, BATCH)
        if not items:
            return 0
        hubs = {h.name: h for h in registry.hubs(node.r)}
        timeout = node.settings.hub_heartbeat_timeout
        shared = Counter(item.lease for item in items)
        changes = []
        # Each goes back to the front of its queue: the newest first, so a batch keeps its order.
        for item in sorted(items, key=lambda i: int(i.id), reverse=True):
            crashed, why = worker_crashed(item, hubs.get(item.hub), timeout, now)
            suspect = False
            if crashed and shared[item.lease] > 1:
                # The worker died on a batch: which message killed it is not known. None of
                # them counts; each is taken alone from now on, so a second crash is attributed.
                suspect, crashed, why = True, False, why + " (on a batch: each message will be tried alone)"
            log.info("item %s of %s taken back: %s", item.id, item.queue, why)
            change = (queues.change().require_lease(item, item.lease).require_lease_expired(item, now)
                      .require_pending(item, item.pending))
            stop_processing(node, change, item, why, now, crashed=crashed, suspect=suspect)
            change.kick(item.queue, queues.celery_queue_of(item.queue))
            changes.append(change)
        return sum(res.ok for res in queues.commit(changes))

    def promote_due_retries(self) -> int:
        queues = self.node.queues
        items = queues.due_retries(now_ms(), BATCH)
        changes = [queues.change().require_status(item, ItemStatus.RETRY.value).promote(item) for item in items]
        return sum(res.ok for res in queues.commit(changes))

    def expire(self) -> int:
        node, queues = self.node, self.node.queues
        now = now_ms()
        # (items in flight are left to their worker, which expires them when it is done; read
        # enough to get past a batch of them)
        items = [i for i in queues.expiring(now, 5 * BATCH) if i.status != ItemStatus.ACTIVE][:BATCH]
        if not items:
            return 0
        messages = queues.messages([i.msg for i in items])
        bodies = queues.bodies([i.msg for i in items if i.msg in messages and messages[i.msg].wants_report])
        changes = []
        for item in items:
            msg = messages.get(item.msg)
            change = queues.change().require_status(item, item.status).complete(item, claimed=False)
            if msg is not None:
                failures = [
                    dsn.Failure(rc.address, _last(dsn.EXPIRED, rc.last_error or item.last_error), rc.original)
                    for rc in item.recipients
                ]
                change.track(Record(Event.FAIL, source="ROUTING", server=node.name, internal_id=msg.id,
                                    message_id=msg.message_id, recipients=[f.recipient for f in failures],
                                    recipient_status=[f.diagnostic for f in failures], sender=msg.sender,
                                    subject=msg.subject, size=msg.size, queue=item.queue), now)
                if msg.id in bodies:
                    queue_report(node, change, msg, bodies[msg.id], failures,
                                 item_id=queues.new_item_ids(1)[0], now=now)
            changes.append(change)
        return sum(res.ok for res in queues.commit(changes))

    def delay_notifications(self) -> int:
        node, queues = self.node, self.node.queues
        now = now_ms()
        due = queues.due_delay_reports(now, BATCH)
        if not due:
            return 0
        messages = queues.messages(due)
        kinds = {q.identity: q.kind for q in queues.queues()}
        sent = 0
        for msg_id in due:
            msg = messages.get(msg_id)
            items: list[Item] = []
            if msg is not None:
                items = [i for i in queues.items_of(msg_id) if kinds.get(i.queue) is not QueueKind.SUBMISSION]
            pending = [(rc, it) for it in items for rc in it.recipients]
            change = queues.change().unschedule_delay_report(msg_id)
            if msg is not None and not pending and queues.items_of(msg_id):
                # Still being categorized: its delay DSN is due as soon as it waits in a
                # delivery queue, so look again in a minute instead of forgetting it.
                queues.commit([change.schedule_delay_report(msg_id, now + 60_000)])
                continue
            if msg is not None and pending and msg.wants_report and node.settings.delay_dsn_enabled:
                body = queues.bodies([msg_id]).get(msg_id, b"")
                failures = [
                    dsn.Failure(rc.address, _last(dsn.DELAYED, rc.last_error or it.last_error), rc.original)
                    for rc, it in pending
                ]
                change.require_no_delay_report(msg_id).delay_report_sent(msg_id, now)
                queue_report(node, change, msg, body, failures, item_id=queues.new_item_ids(1)[0], delayed=True,
                             now=now)
                sent += 1
            queues.commit([change])
        return sent

    def kick_stalled_queues(self) -> int:
        """The safety net for every lost Celery message, and for queues whose Retry time has
        come: a queue with ready mail and no drain gets one."""
        queues = self.node.queues
        stalled = queues.stalled_queues(now_ms())
        results = queues.commit([queues.change().kick(q.identity, q.celery_queue) for q in stalled])
        return sum(bool(res.drains) for res in results)

    def reroute_unreachable(self) -> int:
        """After ``org apply``, messages in the Unreachable queues get another chance: a new
        connector or mailbox may route them now (not while the queue is suspended)."""
        r = self.node.r
        version = number(r.get(keys.ORG_VERSION))
        seen = r.getset(keys.REROUTED_VERSION, version)
        if seen is None or number(seen) == version:
            return 0
        return sum(resubmit(self.node, q.identity) for q in self.node.queues.queues()
                   if q.kind is QueueKind.UNREACHABLE and not q.suspended)

    def renotify_outbox(self) -> int:
        if self._notifier is None:
            self._notifier = Notifier(self.node.r, self.node.app, self.node.orgs)
        directory = self.node.orgs.get()
        return sum(
            self._notifier.renotify_due(server) for server in directory.servers_in_site(self.node.site)
        )


def resubmit(node: Hub, queue: str) -> int:
    """Send every message of ``queue`` that is neither in flight nor held by an operator back
    through the categorizer (Retry-Queue -Resubmit; the Unreachable queue after a change)."""
    queues = node.queues
    now = now_ms()
    found = queues.queues([queue])
    poison = bool(found) and found[0].kind is QueueKind.POISON  # (its messages are all Suspended)
    items = [i for i in queues.items(queues.members(queue))
             if i.status != ItemStatus.ACTIVE and (i.status != ItemStatus.SUSPENDED or poison)]
    # (a message leaving Poison expires again: its expiry was taken off when it went there)
    expires = {m.id: m.expires for m in queues.messages([i.msg for i in items]).values()} if poison else {}
    changes = []
    for item in items:
        target = submission_queue(item.site)
        changes.append(queues.change().require_state(item)
                       .move(item, target, now=now, expires=expires.get(item.msg, 0), reset_crashes=poison))
    return sum(res.ok for res in queues.commit(changes))


def worker_pids() -> list[int]:
    """This process and its living children (Celery's pool): which processes hold leases now.
    A killed child the pool has not reaped yet is dead: listing it would read its crash as a
    stall and count nothing towards Poison. Not Linux: crash detection falls back to restarts."""
    return [os.getpid(), *living_children(os.getpid())]


class Services:
    """The hub's background threads: heartbeat (1 s) and sweeper (``sweep_interval``)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = now_ms()

    def start(self) -> None:
        try:
            queues, now = self.node.queues, now_ms()
            specs = standing_queues(self.node.site, self.node.orgs.get().servers_in_site(self.node.site))
            queues.commit([queues.change().ensure_queue(spec, now) for spec in specs])
        except Exception as exc:  # Redis not there yet: the queues appear with the first mail
            log.warning("could not create the site's queues: %s", exc)
        # What the threads import, imported here, before any of them runs: the pool forks a new
        # process whenever one ends, and a process forked while a thread imports a module gets
        # that module's import lock held by nobody (its next import of it hangs for ever).
        import encodings.idna  # noqa: F401 (httpx's first connection)
        import mailbox  # noqa: F401

        import httpcore  # noqa: F401 (httpx imports it at its first client)

        import mailyard.hub.edgesync
        import mailyard.registry  # noqa: F401
        for target, name in ((self._heartbeat, "heartbeat"), (self._sweep, "sweeper"), (self._edgesync, "edgesync")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        from mailyard.registry import hub_gone

        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        try:
            hub_gone(self.node.r, self.node.name)
            if text(self.node.r.get(keys.SWEEPER)) == self.node.name:
                self.node.r.delete(keys.SWEEPER)
        except Exception:
            pass

    def _edgesync(self) -> None:
        from mailyard.hub import edgesync

        edgesync.run(self.node, self._stop)

    def _heartbeat(self) -> None:
        import mailbox  # which module this process resolves (DESIGN §3: never a shadow)

        from mailyard.registry import hub_heartbeat

        while not self._stop.is_set():
            try:
                extra = {"stdlib_mailbox": str(mailbox.__file__), "pids": json.dumps(worker_pids()),
                         "version": __version__, "concurrency": str(self.node.concurrency)}
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
            except Exception as exc:
                if refused := durability.unreplicated(exc):  # (Redis without a replica: expected)
                    log.warning("sweeper pass failed: %s; trying again", refused.reason)
                else:
                    log.exception("sweeper pass failed; trying again")
            self._stop.wait(interval)
