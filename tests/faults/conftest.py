"""The fault matrix's harness: a steady stream of mail of every kind, and the verdict.

The stream sends, in turn: mailbox to mailbox in the same site, mailbox to the other site,
SMTP in (anonymous, from the demo Internet) to a mailbox, and mailbox to the Internet (an
SMTP sink found through a DNS server on loopback). A message counts as accepted when the
mailbox API said 202 or the receive connector said 250; a refused attempt is retried, as a
client would. The verdict: every accepted message arrives, exactly once at mailboxes (SMTP in
too: a retry after a lost reply is stored once, by its Message-ID); at the sink the
duplicates SMTP cannot avoid are counted and reported. Copies are counted only
once the site is quiet (mailyard.testing.quiet: nothing in flight, no retry to come, every
queue drained, every pickup acknowledged, every Outbox empty), so that a redelivery still to
come cannot add a copy after the count.
"""

from __future__ import annotations

import smtplib
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailyard import registry, tracking
from mailyard.internet.dns import MX, A, DnsServer, Zone
from mailyard.internet.sink import Sink
from mailyard.org import Organization
from mailyard.testing.cluster import Cluster
from mailyard.testing.quiet import wait_quiet
from mailyard.testing.redis_group import RedisGroup
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT, make_org

KINDS = ("local", "remote-site", "smtp-in", "internet")
# kind -> (sender, recipient); smtp-in comes from the demo Internet with the null sender
ROUTES = {
    "local": ("alice@contoso.com", "carol@contoso.com"),
    "remote-site": ("bob@contoso.com", "erin@contoso.com"),
    "smtp-in": ("", "dave@contoso.com"),
    "internet": ("frank@contoso.com", "friend@fabrikam.example"),
}
OUTBOXES = sorted(sender for sender, _ in ROUTES.values() if sender)


@dataclass
class Sent:
    subject: str
    kind: str
    recipient: str  # a mailbox address, or the Internet address at the sink
    message_id: str = ""
    attempts: list[str] = field(default_factory=list)  # each refused try: when, and why


@dataclass
class Verdict:
    case: str
    sent: int
    delivered: int
    duplicates: int
    lost: list[str]
    recovery_s: float  # until every accepted message had arrived once
    quiet_s: float  # until every redelivery was over and the copies were counted

    def line(self) -> str:
        return (f"[fault] {self.case}: sent {self.sent}, delivered {self.delivered}, duplicates "
                f"{self.duplicates} (SMTP's own: a reply lost after the message was sent), lost {len(self.lost)}, recovery {self.recovery_s:.1f}s, "
                f"quiet {self.quiet_s:.1f}s")


def _clock(ms: int | None = None) -> str:
    """HH:MM:SS.mmm (UTC, as the logs and the tracking log), of ``ms`` or of now."""
    ms = int(time.time() * 1000) if ms is None else ms
    return time.strftime("%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}"


@dataclass
class Stream:
    site: Cluster
    sink: Sink
    case: str
    sent: list[Sent] = field(default_factory=list)
    refused: int = 0
    marks: list[str] = field(default_factory=list)  # what the test did, and when (``mark``)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _one(self, n: int) -> None:
        kind = KINDS[n % len(KINDS)]
        subject = f"{self.case} {kind} {n} {uuid.uuid4().hex[:6]}"
        sender, rcpt = ROUTES[kind]
        message_id = f"<{uuid.uuid4().hex}@fault.test>"  # the same on every retry: no new mail
        deadline = time.monotonic() + 120
        attempts: list[str] = []
        while True:  # keep trying until accepted, as a client would (bounded)
            try:
                if kind == "smtp-in":
                    self._smtp_in(rcpt, subject, message_id)
                else:
                    self.site.send(sender, [rcpt], subject=subject, message_id=message_id)
                self.sent.append(Sent(subject, kind, rcpt, message_id, attempts))
                return
            except Exception as exc:  # the component is down: try again, as a client would
                attempts.append(f"{_clock()} {exc!r}"[:300])
                self.refused += 1
                if time.monotonic() > deadline:
                    return
                time.sleep(0.2)

    def _smtp_in(self, rcpt: str, subject: str, message_id: str) -> None:
        hubs = [h for h in registry.hubs(self.site.r) if "Internet" in h.endpoints and h.alive(3)]
        if not hubs:
            raise ConnectionError("no hub listening")
        host, _, port = hubs[len(self.sent) % len(hubs)].endpoints["Internet"].rpartition(":")
        with smtplib.SMTP(host, int(port), local_hostname="sender.example", timeout=10,
                          source_address=("127.0.0.2", 0)) as client:
            client.ehlo_or_helo_if_needed()
            for command, arg in (("mail", "someone@fabrikam.example"), ("rcpt", rcpt)):
                code, reply = getattr(client, command)(arg)
                if code >= 400:
                    raise smtplib.SMTPResponseException(code, reply)
            # A reply to DATA lost after the message was stored makes the retry a second
            # message (the duplicate SMTP itself cannot avoid, RFC 1047): the mailbox stores it
            # once all the same, by its Message-ID.
            client.data(f"Subject: {subject}\r\nMessage-ID: {message_id}\r\n\r\nfault test\r\n")

    def run(self, count: int, interval: float = 0.15) -> Stream:
        def loop() -> None:
            for n in range(count):
                if self._stop.is_set():
                    return
                self._one(n)
                time.sleep(interval)

        self._thread = threading.Thread(target=loop, name="stream", daemon=True)
        self._thread.start()
        return self

    def wait_sent(self, timeout: float = 180) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not finish sending"

    def _counts(self) -> tuple[Counter, Counter]:
        """Copies of each subject at the mailboxes and at the sink (raises while a mailbox
        server restarts)."""
        boxes: Counter = Counter()
        for address in {s.recipient for s in self.sent if s.kind != "internet"}:
            boxes.update(self.site.subjects(address))
        outside = Counter(m["subject"] for m in self.sink.messages("fabrikam.example"))
        return boxes, outside

    def _missing(self, boxes: Counter, outside: Counter) -> list[str]:
        return [s.subject for s in self.sent if (outside if s.kind == "internet" else boxes)[s.subject] == 0]

    def _outboxes(self) -> list[str]:
        return [f"{who}'s Outbox holds {held}" for who in OUTBOXES if (held := self.site.subjects(who, "Outbox"))]

    def mark(self, what: str) -> None:
        self.marks.append(f"{_clock()} {what}")

    def _story(self, subjects: list[str]) -> str:
        """What the client saw of each lost message and what the tracking log holds of it: where
        a loss happened, for the one run in many that shows it."""
        lines = [f"the test: {'; '.join(self.marks)}"] if self.marks else []
        for sent in (s for s in self.sent if s.subject in subjects):
            lines.append(f"{sent.subject} {sent.message_id}: refused {len(sent.attempts)} times before it was taken")
            lines += [f"  tried {a}" for a in sent.attempts]
            try:
                records = tracking.search(self.site.r, message_id=sent.message_id)
            except Exception as exc:
                lines.append(f"  (tracking log unreadable: {exc!r})")
                continue
            for rec in records:
                lines.append(f"  {_clock(rec.time_ms)} {rec.event} {rec.server} {rec.internal_id} {rec.queue} {rec.recipients} "
                             f"{rec.recipient_status} {rec.context}"[:400])
            if not records:
                lines.append("  the tracking log has nothing of it")
        return "\n".join(lines)

    def verdict(self, started: float, timeout: float = 180, quiet_timeout: float = 120) -> Verdict:
        """Wait until everything accepted arrived (or the deadline), then until the site is
        quiet (every redelivery over), and only then count the copies."""
        def complete() -> bool:
            return not self._missing(*self._counts())

        try:
            wait_until(complete, timeout=timeout)
        except AssertionError:
            pass  # what is missing is reported below, once nothing can arrive any more
        recovery = time.monotonic() - started
        try:
            reading = wait_quiet(self.site.r, timeout=quiet_timeout, also=self._outboxes)
        except AssertionError as exc:
            try:
                missing = self._missing(*self._counts())
            except Exception as read:
                missing = [f"(could not count: {read!r})"]
            raise AssertionError(f"[fault] {self.case}: {exc}\nnot arrived: {missing}\n"
                                 f"{self.site.all_logs(30)}") from None
        quiet = time.monotonic() - started
        boxes, outside = wait_until(self._counts, timeout=30, message="could not read the mailboxes")
        lost = self._missing(boxes, outside)
        doubled_boxes = {s.subject: boxes[s.subject] for s in self.sent if s.kind != "internet" and boxes[s.subject] > 1}
        duplicates = sum(outside[s.subject] - 1 for s in self.sent if s.kind == "internet" and outside[s.subject] > 1)
        verdict = Verdict(self.case, len(self.sent), len(self.sent) - len(lost), duplicates, lost, recovery, quiet)
        print(verdict.line())
        assert not doubled_boxes, f"{verdict.line()}\ndelivered more than once to a mailbox: {doubled_boxes}"
        assert not lost, (f"{verdict.line()}\nlost: {lost}\n{self._story(lost)}\nat the end: "
                          f"{reading.describe()}\n{self.site.all_logs(30)}")
        return verdict


def fault_org(dns: DnsServer, smtp_port: int, **transport) -> Organization:
    data = make_org(lease_time=5, **transport).model_dump(mode="json")
    data["transport"]["dns_servers"] = [dns.address]
    for conn in data["send_connectors"]:
        conn["port"] = smtp_port
    return Organization.model_validate(data)


@dataclass
class World:
    """A whole site on its own Redis: both sites' hubs, all mailbox servers, a DNS server and
    the Internet's MX host, with every process restarted when it dies."""

    redis: RedisServer | RedisGroup
    dns: DnsServer
    sink: Sink
    site: Cluster

    def stream(self, case: str) -> Stream:
        return Stream(self.site, self.sink, case)


@pytest.fixture
def world_factory(tmp_path: Path):
    made: list[World] = []

    def make(*, hub_redis_url: str | None = None, hubs_per_site: int = 2, faults: str | None = None,
             redis: RedisServer | RedisGroup | None = None, **transport) -> World:
        server = redis or RedisServer(tmp_path / f"redis{len(made)}", databases=2).start()
        zone = Zone()
        zone.replace("fabrikam.example", MX(10, "mx.fabrikam.example"))
        zone.replace("mx.fabrikam.example", A("127.0.0.3"))
        dns = DnsServer(zone)
        dns.start()
        sink = Sink(tmp_path / f"sink{len(made)}", host="127.0.0.3")  # (port 0: its own free port)
        sink.start()
        port = sink.port
        site = Cluster(server.url(0), tmp_path / f"site{len(made)}", fault_org(dns, port, **transport), cwd=ROOT)
        world = World(server, dns, sink, site)
        made.append(world)
        site.start_mailboxes()
        hubs = []
        for site_name in ("Amsterdam", "London"):
            for i in range(1, hubs_per_site + 1):
                hubs.append(site.start_hub(site_name, f"{site_name[:3].lower()}-{i}", wait=False, faults=faults,
                                           redis_url=hub_redis_url))
        for hub in hubs:
            site.wait_hub(hub)
            site.smtp(hub.name)
        site.supervise()
        return world

    yield make
    for world in made:
        world.site.close()
        world.sink.stop()
        world.dns.stop()
        world.redis.stop()

