"""The organization directory in Redis: every node reads the same validated version."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable

import redis
import redis.asyncio

from mailyard import keys
from mailyard.directory import Directory
from mailyard.errors import SiteError
from mailyard.org import Organization
from mailyard.redisconn import number

log = logging.getLogger("mailyard.org")


def apply_org(r: redis.Redis, org: Organization) -> int:
    """Store a validated organization and announce it; returns the new version.

    Without a ``server_token`` in the file, the one already in use is kept (or one is
    generated), so running hubs and mailbox servers keep trusting each other."""
    if not org.transport.server_token:
        token = ""
        current = r.get(keys.ORG)
        if current:
            token = Organization.from_json(current).transport.server_token
        token = token or secrets.token_urlsafe(24)
        org = org.model_copy(update={"transport": org.transport.model_copy(update={"server_token": token})})
    pipe = r.pipeline(transaction=True)
    pipe.set(keys.ORG, org.to_json())
    pipe.incr(keys.ORG_VERSION)
    _, version = pipe.execute()
    r.publish(keys.ORG_CHANNEL, version)
    return int(version)


def read_org(r: redis.Redis) -> tuple[int, Organization]:
    pipe = r.pipeline(transaction=True)
    pipe.get(keys.ORG_VERSION)
    pipe.get(keys.ORG)
    version, text = pipe.execute()
    if text is None:
        raise SiteError("no organization in Redis yet: run `mailyard org apply FILE` first")
    return number(version), Organization.from_json(text)


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
        self.directory, self._version = Directory(Organization.from_json(text)), version
        for listener in self.listeners:
            await listener(self.directory)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception as exc:  # Redis restarting: keep the last good version
                log.warning("could not refresh the organization: %s", exc)
