"""Failed SMTP logons, counted in Redis so that a lockout holds across connections and hubs.

A receive connector asks ``locked`` before it checks a password, and tells ``failed`` after
a wrong one. Two counters, each over the organization's ``logon_failure_window``:

- per source (``receive_policy.source_of``: an IPv4 address, an IPv6 /64): at
  ``logon_failures_per_source`` the source is refused every logon for
  ``logon_lockout_duration``, the right password included;
- per mailbox: at ``logon_failures_per_account`` (guessing spread over many sources) the
  mailbox is locked for the sources that failed on it, never for one that did not, so that
  its owner, logging on from elsewhere, is not locked out by whoever guesses.

Each lockout that begins is a LOCKOUT event in message tracking. The keys
(``keys.logon_*``) expire by themselves; a login that names no mailbox counts only against
its source.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio

from mailyard import keys
from mailyard.org import TransportSettings


@dataclass(frozen=True)
class Lockout:
    """A lockout that began: of a source, or of a mailbox (for the sources that failed on it)."""

    of: str  # "source" or "mailbox"
    name: str
    failures: int


async def locked(r: redis.asyncio.Redis, source: str, mailbox: str | None) -> bool:
    """Whether a logon from ``source`` (as ``mailbox``, if the login names one) is refused."""
    pipe = r.pipeline(transaction=False)
    pipe.exists(keys.logon_lock_source(source))
    if mailbox:
        pipe.exists(keys.logon_lock_account(mailbox))
        pipe.exists(keys.logon_failed(mailbox, source))
    found = await pipe.execute()
    return bool(found[0]) or (bool(mailbox) and bool(found[1]) and bool(found[2]))


async def failed(r: redis.asyncio.Redis, settings: TransportSettings, source: str,
                 mailbox: str | None) -> list[Lockout]:
    """Count a failed logon; the lockouts it began (at most one of each kind per duration)."""
    window = max(1, int(settings.logon_failure_window * 1000))
    duration = max(1, int(settings.logon_lockout_duration * 1000))
    pipe = r.pipeline(transaction=True)
    pipe.incr(keys.logon_fails_source(source))
    pipe.pexpire(keys.logon_fails_source(source), window, nx=True)
    if mailbox:
        pipe.incr(keys.logon_fails_account(mailbox))
        pipe.pexpire(keys.logon_fails_account(mailbox), window, nx=True)
        # Remembered as long as the mailbox's lockout may last: a locked-out guesser must not
        # get its turn back halfway through by its own failure being forgotten.
        pipe.set(keys.logon_failed(mailbox, source), 1, px=max(window, duration))
    counts = await pipe.execute()
    began = []
    per_source, per_account = settings.logon_failures_per_source, settings.logon_failures_per_account
    if per_source and counts[0] >= per_source and await r.set(keys.logon_lock_source(source), 1,
                                                             px=duration, nx=True):
        began.append(Lockout("source", source, counts[0]))
    if mailbox and per_account and counts[2] >= per_account and await r.set(
            keys.logon_lock_account(mailbox), 1, px=duration, nx=True):
        began.append(Lockout("mailbox", mailbox, counts[2]))
    return began
