"""The organization directory in Redis: every node reads the same validated version."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable

import redis
import redis.asyncio

from mailyard import keys, passwords
from mailyard.directory import Directory
from mailyard.errors import SiteError
from mailyard.org import Organization
from mailyard.redisconn import number

log = logging.getLogger("mailyard.org")


def apply_org(r: redis.Redis, org: Organization, *, keep_edges: bool = True) -> int:
    """Store a validated organization and announce it; returns the new version.

    Mailbox passwords are stored only as hashes: a password given in clear is hashed here
    (keeping the hash already stored when it is of the same password, so applying the same file
    again changes nothing a hub verifies against). ``keep_edges``: an organization without Edge
    subscriptions keeps the stored ones (``keep_edge_subscriptions``); False where the
    subscriptions themselves change (mailyard.edge_subscriptions)."""
    current = _stored(r)
    org = hash_passwords(org, current)
    if keep_edges:
        org = keep_edge_subscriptions(org, current)
    pipe = r.pipeline(transaction=True)
    pipe.set(keys.ORG, org.to_json())
    pipe.incr(keys.ORG_VERSION)
    _, version = pipe.execute()
    r.publish(keys.ORG_CHANNEL, version)
    return int(version)


def hash_passwords(org: Organization, current: Organization | None = None) -> Organization:
    """``org`` with every password in clear (mailboxes' and operators') replaced by its hash:
    the hash ``current`` has for that logon when it verifies that password, else a new one
    (one scrypt each)."""
    stored = {mb.address: mb.password for mb in current.mailboxes} if current else {}
    stored_ops = {op.name: op.password for op in current.operators} if current else {}

    def hashed(password: str, known: str) -> str:
        if not password or passwords.is_hash(password):
            return password
        return known if passwords.verify(password, known) else passwords.hash_password(password)

    mailboxes = [mb.model_copy(update={"password": hashed(mb.password, stored.get(mb.address, ""))})
                 for mb in org.mailboxes]
    # An operator the file gives no password keeps the one stored (site up's local operator,
    # whose password is in its secrets.toml, survives an `org apply` of the same file).
    operators = [op.model_copy(update={"password": hashed(op.password, stored_ops.get(op.name, ""))
                                       if op.password else stored_ops.get(op.name, "")})
                 for op in org.operators]
    return org.model_copy(update={"mailboxes": mailboxes, "operators": operators})


def keep_edge_subscriptions(org: Organization, current: Organization | None) -> Organization:
    """``org`` with the Edge subscriptions stored now, and the send connectors they are the
    source of, when it names none itself: an organization file never holds them (``mailyard
    org edge import`` makes them), so applying the file again keeps them."""
    if current is None or org.edge is not None or org.edge_subscriptions or not current.edge_subscriptions:
        return org
    stored = {c.name: c for c in current.send_connectors if c.source_edges}
    # A connector of the file with the name of one the import made is that one, changed (its
    # port, say): it keeps its Edges.
    connectors = [c.model_copy(update={"source_edges": stored[c.name].source_edges})
                  if c.name in stored and not c.source_edges else c for c in org.send_connectors]
    named = {c.name for c in org.send_connectors}
    kept = [c for name, c in stored.items() if name not in named]
    return org.model_copy(update={"edge_subscriptions": current.edge_subscriptions,
                                  "send_connectors": [*connectors, *kept]})


def _stored(r: redis.Redis) -> Organization | None:
    """The organization in Redis now, if there is one Mailyard can still read."""
    text = r.get(keys.ORG)
    if not text:
        return None
    try:
        return Organization.from_json(text)
    except ValueError as exc:  # (pydantic's ValidationError): written by another version
        log.warning("the organization in Redis could not be read (%s): replacing it", exc)
        return None


def _warn_clear_passwords(org: Organization) -> None:
    clear = [mb.address for mb in org.mailboxes if mb.password and not passwords.is_hash(mb.password)]
    if clear:
        log.warning("the organization in Redis has %d mailbox password(s) in clear (stored by an older "
                    "Mailyard); they cannot log on until `mailyard org apply` stores their hashes", len(clear))


def read_org(r: redis.Redis) -> tuple[int, Organization]:
    pipe = r.pipeline(transaction=True)
    pipe.get(keys.ORG_VERSION)
    pipe.get(keys.ORG)
    version, text = pipe.execute()
    if text is None:
        raise SiteError("no organization in Redis yet: run `mailyard org apply FILE` first")
    org = Organization.from_json(text)
    _warn_clear_passwords(org)
    return number(version), org


class OrgCache:
    """The current directory, re-read when ``my:org:version`` moves (checked at most every
    ``max_age`` seconds), so ``mailyard org apply`` takes effect without a restart."""

    def __init__(self, r: redis.Redis, max_age: float = 1.0) -> None:
        self._r = r
        self._max_age = max_age
        self._lock = threading.Lock()
        self._checked = 0.0
        self._version = -1
        self._dir: Directory | None = None

    def get(self) -> Directory:
        now = time.monotonic()
        if self._dir is not None and now - self._checked < self._max_age:
            return self._dir
        with self._lock:
            version = number(self._r.get(keys.ORG_VERSION))
            if self._dir is None or version != self._version:
                version, org = read_org(self._r)
                self._dir, self._version = Directory(org), version
            self._checked = now
            return self._dir

    @property
    def org(self) -> Organization:
        return self.get().org

    @property
    def version(self) -> int:
        """The version of the directory ``get`` returns now."""
        self.get()
        return self._version

    def snapshot(self) -> tuple[int, Directory]:
        """The directory and its version, read together (``version`` after ``org`` may be a
        newer directory's: whatever is labelled with it must be what was read)."""
        self.get()
        with self._lock:
            assert self._dir is not None
            return self._version, self._dir

    def invalidate(self) -> None:
        self._checked = 0.0


class AsyncOrgWatcher:
    """For asyncio servers: the current directory, refreshed in the background once a
    second, so request handlers read it without waiting on Redis."""

    def __init__(self, r: redis.asyncio.Redis, interval: float = 1.0) -> None:
        self._r = r
        self._interval = interval
        self._version = -1
        self.directory: Directory | None = None
        self.listeners: list[Callable[[Directory], Awaitable[None]]] = []

    def current(self) -> Directory:
        """The directory read last (SiteError before the first ``refresh``)."""
        if self.directory is None:
            raise SiteError("the organization has not been read yet")
        return self.directory

    async def refresh(self) -> bool:
        """Re-read the organization if its version moved; True if it changed."""
        version = number(await self._r.get(keys.ORG_VERSION))
        if version == self._version and self.directory is not None:
            return False
        text = await self._r.get(keys.ORG)
        if text is None:
            raise SiteError("no organization in Redis yet: run `mailyard org apply FILE` first")
        org = Organization.from_json(text)
        _warn_clear_passwords(org)
        self.directory, self._version = Directory(org), version
        for listener in self.listeners:
            await listener(self.directory)
        return True

    async def run(self) -> None:
        """Refresh as soon as ``apply_org`` announces a version, and every ``interval`` in any
        case (an announcement missed while the subscription was down): an `org apply`, or an
        Edge's EdgeSync, is in effect here within milliseconds, not up to a second later."""
        pubsub: redis.asyncio.client.PubSub | None = None
        while True:
            try:
                if pubsub is None:
                    pubsub = self._r.pubsub(ignore_subscribe_messages=True)
                    await pubsub.subscribe(keys.ORG_CHANNEL)
                await pubsub.get_message(timeout=self._interval)
            except Exception:  # Redis away: poll, and subscribe again once it is back
                if pubsub is not None:
                    await _close_quietly(pubsub)
                pubsub = None
                await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception as exc:  # Redis restarting: keep the last good version
                log.warning("could not refresh the organization: %s", exc)


async def _close_quietly(pubsub: redis.asyncio.client.PubSub) -> None:
    try:
        await pubsub.aclose()
    except Exception:  # (its connection is already gone)
        pass
