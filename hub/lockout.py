"""Failed SMTP logons, counted in Redis so that a lockout holds across connections and hubs.

A receive connector asks ``locked`` before it checks a password, counts the logon as a
failure (``attempt``: so that logons racing each other cannot all pass while the count lags),
and takes it back if the password was right (``succeeded``), or sees which lockouts the
failure began (``failed``). Two counters, each over the organization's ``logon_failure_window``:

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


async def attempt(r: redis.asyncio.Redis, settings: TransportSettings, source: str,
                  mailbox: str | None) -> Attempt:
    """Count a logon about to be checked as a failure (``succeeded`` takes it back)."""
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
        pipe.set(keys.logon_failed(mailbox, source), 1, px=max(window, duration), get=True)
    counts = await pipe.execute()
    from_source = int(counts[0])
    of_mailbox = int(counts[2]) if mailbox else 0
    failed_before = bool(mailbox) and counts[4] is not None
    per_source, per_account = settings.logon_failures_per_source, settings.logon_failures_per_account
    over = bool(per_source and from_source > per_source) or bool(
        mailbox and per_account and of_mailbox > per_account and failed_before)
    return Attempt(source, mailbox, from_source, of_mailbox, failed_before, over)


async def succeeded(r: redis.asyncio.Redis, attempt: Attempt) -> None:
    """The password was right: the attempt was no failure."""
    pipe = r.pipeline(transaction=True)
    pipe.decr(keys.logon_fails_source(attempt.source))
    if attempt.mailbox:
        pipe.decr(keys.logon_fails_account(attempt.mailbox))
        if not attempt.failed_before:
            pipe.delete(keys.logon_failed(attempt.mailbox, attempt.source))
    await pipe.execute()


async def failed(r: redis.asyncio.Redis, settings: TransportSettings, attempt: Attempt) -> list[Lockout]:
    """The password was wrong: the lockouts the attempt began (at most one of each kind per duration)."""
    duration = max(1, int(settings.logon_lockout_duration * 1000))
    began = []
    per_source, per_account = settings.logon_failures_per_source, settings.logon_failures_per_account
    if per_source and attempt.from_source >= per_source and await r.set(
            keys.logon_lock_source(attempt.source), 1, px=duration, nx=True):
        began.append(Lockout("source", attempt.source, attempt.from_source))
    if attempt.mailbox and per_account and attempt.of_mailbox >= per_account and await r.set(
            keys.logon_lock_account(attempt.mailbox), 1, px=duration, nx=True):
        began.append(Lockout("mailbox", attempt.mailbox, attempt.of_mailbox))
    return began
