"""Back pressure instead of collapse: past its thresholds a site answers 452 4.3.1 at MAIL
FROM (outside senders first, at Medium; everyone at High), holds Outbox pickups at High, and
recovers by itself; nothing accepted is lost."""

from __future__ import annotations

import smtplib
import ssl
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from mailyard import keys
from mailyard.hub.pressure import Level, next_level
from mailyard.hub.queue_actions import act_on_queues, admin_node
from mailyard.redisconn import text
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import make_org


@pytest.mark.parametrize(
    ("current", "value", "expected"),
    [
        (Level.NORMAL, 10, Level.NORMAL), (Level.NORMAL, 20, Level.MEDIUM), (Level.NORMAL, 40, Level.HIGH),
        (Level.MEDIUM, 15, Level.MEDIUM), (Level.MEDIUM, 9, Level.NORMAL), (Level.MEDIUM, 40, Level.HIGH),
        (Level.HIGH, 25, Level.HIGH), (Level.HIGH, 15, Level.MEDIUM), (Level.HIGH, 5, Level.NORMAL),
    ],
)
def test_levels_rise_at_medium_and_high_and_fall_only_below_the_lower_threshold(current, value, expected) -> None:
    # thresholds Normal=10 Medium=20 High=40
    assert next_level(current, value, 10, 20, 40) is expected


def level(site, name: str = "Amsterdam") -> Level:
    value = site.r.hget(keys.pressure(name), "level")
    return Level(int(value)) if value is not None else Level.NORMAL


@contextmanager
def session(site, sender: str, logon: bool | None = None) -> Iterator[smtplib.SMTP]:
    """An SMTP session of ``sender``'s: a mailbox of the organization logs on (the only way a
    client proves it is of the organization) unless told not to; anyone else is anonymous,
    from the Internet."""
    if sender.endswith("@contoso.com") if logon is None else logon:
        with smtplib.SMTP(*site.smtp("bp-1", "Default"), local_hostname="client.example", timeout=15) as c:
            c.starttls(context=_unverified())
            c.login(sender, f"{sender.split('@')[0]}-demo-password")
            yield c
    else:
        with smtplib.SMTP(*site.smtp("bp-1", "Internet"), local_hostname="client.example", timeout=15,
                          source_address=("127.0.0.2", 0)) as c:
            c.ehlo()
            yield c


def _unverified() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


def mail_from(site, sender: str, logon: bool | None = None) -> int:
    with session(site, sender, logon) as c:
        code, text = c.docmd(f"MAIL FROM:<{sender}>")
        if code == 452:
            assert text == b"4.3.1 Insufficient system resources", text
        return code


def send(site, sender: str, subject: str) -> None:
    with session(site, sender) as c:
        c.sendmail(sender, ["bob@contoso.com"], f"From: {sender}\r\nSubject: {subject}\r\n\r\nx\r\n")


def test_a_growing_submission_queue_brings_medium_then_high_then_recovery(cluster_factory) -> None:
    site = cluster_factory(make_org(pressure_submission_normal=2, pressure_submission_medium=4,
                                    pressure_submission_high=7))
    site.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
    site.start_hub("Amsterdam", "bp-1")
    node = admin_node(site.redis_url)
    act_on_queues(node, "suspend", ["Amsterdam\\Submission"])  # the categorizer falls behind

    accepted = []
    for i in range(4):
        send(site, "someone@fabrikam.example", f"outside {i}")
        accepted.append(f"outside {i}")
    wait_until(lambda: level(site) is Level.MEDIUM, timeout=15)
    # Medium: outside senders wait (receive connectors see the level within a second)...
    wait_until(lambda: mail_from(site, "someone@fabrikam.example") == 452, timeout=10)
    # ...while the organization's own senders still get through (logged on: an anonymous
    # client that writes an address of ours is not one of ours)
    assert mail_from(site, "alice@contoso.com") == 250
    assert mail_from(site, "alice@contoso.com", logon=False) == 452
    # Three more make seven, High: a fourth could meet High already (the level is sampled
    # every second, and under load a session takes longer than that)
    for i in range(3):
        send(site, "alice@contoso.com", f"inside {i}")
        accepted.append(f"inside {i}")
    wait_until(lambda: level(site) is Level.HIGH, timeout=15)
    # High: everyone waits, and mailbox submissions stay in the Outbox
    wait_until(lambda: mail_from(site, "alice@contoso.com") == 452, timeout=10)
    site.send("carol@contoso.com", ["bob@contoso.com"], subject="from an outbox")
    pending = keys.submit_pending("MBX-AMS-02")
    wait_until(lambda: site.r.zcard(pending) == 1, timeout=10)
    assert site.subjects("carol@contoso.com", "Outbox") == ["from an outbox"]

    # The pressure goes away by itself once the queue drains
    act_on_queues(node, "resume", ["Amsterdam\\Submission"])
    wait_until(lambda: level(site) is Level.NORMAL, timeout=30)
    wait_until(lambda: mail_from(site, "someone@fabrikam.example") == 250, timeout=10)
    for subject in [*accepted, "from an outbox"]:
        site.wait_for_subject("bob@contoso.com", subject, timeout=60)
    counts = Counter(site.subjects("bob@contoso.com"))
    assert all(counts[s] == 1 for s in [*accepted, "from an outbox"]), counts


def test_redis_memory_near_maxmemory_refuses_mail_until_it_is_freed(cluster_factory, tmp_path) -> None:
    small = RedisServer(tmp_path / "redis", maxmemory="40mb", databases=2).start()
    try:
        site = cluster_factory(make_org(), redis_url=small.url(0))
        site.start_mailboxes(["MBX-AMS-01"])
        site.start_hub("Amsterdam", "bp-1")
        assert mail_from(site, "someone@fabrikam.example") == 250
        ballast = small.url(1)
        import redis

        filler = redis.Redis.from_url(ballast)
        chunk = b"x" * 1_000_000
        for i in range(40):
            try:
                filler.set(f"ballast:{i}", chunk)
            except redis.ResponseError:  # OOM: Redis itself is full; exactly what we guard
                break
            if level(site) is Level.HIGH:
                break
        wait_until(lambda: level(site) is Level.HIGH, timeout=15,
                   message=lambda: site.r.hgetall(keys.pressure("Amsterdam")))
        readings = text(site.r.hget(keys.pressure("Amsterdam"), "readings"))
        assert "Memory" in readings and "[High]" in readings
        wait_until(lambda: mail_from(site, "alice@contoso.com") == 452, timeout=10)
        filler.flushdb()
        wait_until(lambda: level(site) is Level.NORMAL, timeout=20)
        wait_until(lambda: mail_from(site, "someone@fabrikam.example") == 250, timeout=10)
        send(site, "someone@fabrikam.example", "after the storm")
        site.wait_for_subject("bob@contoso.com", "after the storm")
    finally:
        small.stop()
