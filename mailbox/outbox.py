"""The Outbox items a mailbox server holds, in memory: what hubs take, and what the Mail
Submission Service keeps registered in Redis.

The server is the only writer of its Maildirs, so the index is read from disk once, at
start, and then kept by the API as messages enter Outboxes ("Send") and leave them for Sent
Items (a hub's acknowledgement). Nothing scans the Outboxes again: with 10,000 mailboxes an
idle server does no work for them.

A hub takes up to ``limit`` items at once (``take``, oldest first) and holds them under a
lease, so that a second hub kicked meanwhile takes other items rather than the same ones.
A hub that dies holding items loses its lease when it runs out; the items are then taken
again (the hub's pickup is idempotent per item, so a repeat creates nothing).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

Ref = tuple[str, str]  # (mailbox, item id)


class OutboxIndex:
    """Every Outbox item of one server, oldest first, with the lease a hub holds on it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[Ref, float] = {}  # item -> monotonic time its lease ends (0: free)

    def load(self, items: Iterable[Ref]) -> None:
        """The Outbox items found on disk at start (item ids begin with their time)."""
        with self._lock:
            for ref in sorted(items, key=lambda ref: ref[1]):
                self._leases.setdefault(ref, 0.0)

    def add(self, mailbox: str, item: str) -> None:
        with self._lock:
            self._leases.setdefault((mailbox, item), 0.0)

    def remove(self, mailbox: str, item: str) -> None:
        with self._lock:
            self._leases.pop((mailbox, item), None)

    def take(self, limit: int, lease_s: float) -> list[Ref]:
        """Up to ``limit`` items no hub holds, oldest first, leased for ``lease_s``."""
        now = time.monotonic()
        taken: list[Ref] = []
        with self._lock:
            for ref, until in self._leases.items():
                if until <= now:
                    self._leases[ref] = now + lease_s
                    taken.append(ref)
                    if len(taken) >= limit:
                        break
        return taken

    def release(self, refs: Iterable[Ref]) -> None:
        """Let other hubs take these items at once (the hub holding them could not)."""
        with self._lock:
            for ref in refs:
                if ref in self._leases:
                    self._leases[ref] = 0.0

    def items(self) -> list[Ref]:
        with self._lock:
            return list(self._leases)

    def __contains__(self, ref: object) -> bool:
        return ref in self._leases

    def __len__(self) -> int:
        return len(self._leases)
