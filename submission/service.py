"""The Mail Submission Service: tell a hub of the site that an Outbox holds a message.

It runs inside each mailbox server. When a message enters an Outbox it notifies one hub of
the server's own site, round robin over the hubs that are alive, by sending a pickup task
to that hub's own Celery queue. The item stays in ``my:submit:pending:<server>`` until a hub
acknowledges the pickup (the mailbox server then moves it to Sent Items); if that does not
happen within ``transport.submission_ack_timeout``, the next live hub is notified. With no
hub alive the message waits in the Outbox and goes as soon as a hub appears, as in Exchange.

It reaches hubs only through the Celery task name and the hub registry in Redis.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable

import redis
from celery import Celery

from mailyard import keys, tracking
from mailyard.broker import TASK_PICKUP, hub_queue, make_app
from mailyard.orgstore import OrgCache
from mailyard.redisconn import number, text, texts
from mailyard.registry import live_hubs, now_ms
from mailyard.scripts import script
from mailyard.tracking import Event, Record
from mailyard.txn import Txn

log = logging.getLogger("mailyard.submission")

NO_HUB_RECHECK_MS = 1000  # with no live hub, look again this often


HIGH = 2  # mailyard.hub.pressure.Level.HIGH (this service does not import hub code)


def _held(r: redis.Redis, site: str) -> bool:
    return number(r.hget(keys.pressure(site), "level")) >= HIGH


def parse_ref(ref: str) -> tuple[str, str, str]:
    server, mailbox, item = ref.split("/", 2)
    return server, mailbox, item


class Notifier:
    """Round-robin notification of the live hubs of a site (shared by the mailbox server's
    service and the hubs' sweeper, which re-notifies when a mailbox server cannot)."""

    def __init__(self, r: redis.Redis, app: Celery, orgs: OrgCache) -> None:
        self.r = r
        self.app = app
        self.orgs = orgs
        self._turn = itertools.count()

    def notify(self, ref: str, *, avoid: str | None = None) -> str | None:
        """Notify the next live hub of the item's site; returns the hub, or None if none."""
        server, mailbox, item = parse_ref(ref)
        directory = self.orgs.get()
        site = directory.site_of_server.get(server)
        if site is None:
            return None
        if _held(self.r, site):
            return None  # back pressure at High: mail submission from mailbox servers pauses
        candidates = live_hubs(self.r, site, directory.org.transport.hub_heartbeat_timeout)
        if not candidates:
            return None
        if avoid in candidates and len(candidates) > 1:
            candidates.remove(avoid)
        hub = candidates[next(self._turn) % len(candidates)]
        self.app.send_task(TASK_PICKUP, args=[server, mailbox, item], queue=hub_queue(hub))
        txn = Txn()
        txn.op("HSET", keys.submit(ref), "hub", hub, "notified", now_ms())
        txn.op("HINCRBY", keys.submit(ref), "notifications", 1)
        txn.op("HSETNX", keys.submit(ref), "first", now_ms())
        txn.op("EXPIRE", keys.submit(ref), 30 * 86400)
        tracking.add(
            txn,
            Record(
                Event.SUBMIT,
                source="STOREDRIVER",
                server=server,
                context=f"Mailbox:{mailbox}, Item:{item}, Hub:{hub}",
                sender=mailbox,
            ),
            directory.org.transport.message_tracking_log_max_age,
        )
        txn.run(self.r)
        return hub

    def renotify_due(self, server: str, *, limit: int = 100) -> int:
        """Re-notify the items of ``server`` whose pickup was not acknowledged in time."""
        org = self.orgs.org
        hold_ms = int(org.transport.submission_ack_timeout * 1000)
        due = script(self.r, "due")(
            keys=[keys.submit_pending(server)], args=[now_ms(), limit, hold_ms]
        )
        sent = 0
        for ref in texts(due):
            last = text(self.r.hget(keys.submit(ref), "hub"))
            hub = self.notify(ref, avoid=last or None)
            if hub is None:
                # Nobody to tell: keep it due so the first hub that appears gets it.
                self.r.zadd(keys.submit_pending(server), {ref: now_ms() + NO_HUB_RECHECK_MS}, xx=True)
            else:
                sent += 1
        return sent


class SubmissionService:
    """The service of one mailbox server: registers Outbox items and keeps them moving."""

    def __init__(
        self,
        r: redis.Redis,
        broker_url: str,
        orgs: OrgCache,
        server: str,
        outbox_items: Callable[[], Iterable[tuple[str, str]]],
        *,
        scan_interval: float = 5.0,
    ) -> None:
        self.r = r
        self.server = server
        self.notifier = Notifier(r, make_app(broker_url), orgs)
        self.orgs = orgs
        self._outbox_items = outbox_items
        self._scan_interval = scan_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ref(self, mailbox: str, item: str) -> str:
        return keys.outbox_ref(self.server, mailbox, item)

    def submitted(self, mailbox: str, item: str) -> None:
        """A message entered an Outbox (it is already durable on disk): notify a hub."""
        ref = self.ref(mailbox, item)
        timeout_ms = int(self.orgs.org.transport.submission_ack_timeout * 1000)
        try:
            self.r.zadd(keys.submit_pending(self.server), {ref: now_ms() + timeout_ms})
            if self.notifier.notify(ref) is None:
                self.r.zadd(keys.submit_pending(self.server), {ref: now_ms()}, xx=True)
        except redis.RedisError as exc:
            # The message is safe in the Outbox; the periodic scan registers it later.
            log.warning("could not register outbox item %s now: %s", ref, exc)

    def acknowledged(self, mailbox: str, item: str) -> None:
        """A hub has the message: it left the Outbox for Sent Items."""
        ref = self.ref(mailbox, item)
        pipe = self.r.pipeline(transaction=True)
        pipe.zrem(keys.submit_pending(self.server), ref)
        pipe.delete(keys.submit(ref))
        pipe.execute()

    def scan(self) -> int:
        """Register Outbox items Redis does not know (after a Redis loss or a crash)."""
        added = 0
        pending = keys.submit_pending(self.server)
        for mailbox, item in self._outbox_items():
            ref = self.ref(mailbox, item)
            if self.r.zadd(pending, {ref: now_ms()}, nx=True):
                added += 1
        return added

    def run_once(self) -> None:
        self.notifier.renotify_due(self.server)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="submission", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        last_scan = 0.0
        while not self._stop.is_set():
            try:
                if now_ms() - last_scan >= self._scan_interval * 1000:
                    if added := self.scan():
                        log.info("registered %d outbox item(s) found on disk", added)
                    last_scan = now_ms()
                self.run_once()
            except Exception:  # keep the service alive through Redis restarts and the like
                log.exception("submission service pass failed; retrying")
                self._stop.wait(1.0)
            self._stop.wait(0.25)
