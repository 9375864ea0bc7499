"""Arrival in a Maildir: the benchmark's mailbox variants watch the ``new/`` directories of
the Inboxes the load goes to (a Mailyard mailbox server's, or Postfix's ``virtual(8)``'s).

A message is readable in an Inbox the moment its file is renamed from ``tmp/`` into
``new/``; the rename sets the file's ctime, which is what is taken as its arrival (the mtime
would be the last write, before the fsync). Each file is read once, its first 8 KB: the
message is named by its ``X-Bench-Id`` (the SMTP load), its ``Subject: bench <id>`` (the
mailbox API's load) or its ``Message-Id`` (``smtp-source``)."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from mailyard.testing.waiting import Timeout, wait_until

BENCH_ID = re.compile(rb"^X-Bench-Id: (\S+)", re.MULTILINE | re.IGNORECASE)
SUBJECT = re.compile(rb"^Subject: bench (\S+)", re.MULTILINE)
MESSAGE_ID = re.compile(rb"^Message-Id: (\S+)", re.MULTILINE | re.IGNORECASE)


class MaildirArrivals:
    """The arrivals in the ``new/`` directories of some Maildirs (directory -> its owner's
    address), with the interface :func:`run.inject` reads a sink through."""

    def __init__(self, inboxes: dict[Path, str]) -> None:
        self.inboxes = inboxes
        self._seen: dict[str, tuple[str, str, float] | None] = {}  # file name -> arrival (None: not ours)
        self._count = 0

    def _read_new(self) -> None:
        for directory, owner in self.inboxes.items():
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:  # Postfix's virtual(8) makes the Maildir at the first delivery
                continue
            for entry in entries:
                key = f"{directory}/{entry.name}"
                if key in self._seen:
                    continue
                try:
                    with open(entry.path, "rb") as f:
                        head = f.read(8192)
                    ctime = entry.stat().st_ctime
                except FileNotFoundError:  # moved out of new/ meanwhile (read by a client)
                    continue
                found = BENCH_ID.search(head) or SUBJECT.search(head) or MESSAGE_ID.search(head)
                self._seen[key] = (found.group(1).decode(), owner, ctime) if found else None
                self._count += found is not None

    def count(self) -> int:
        self._read_new()
        return self._count

    def arrivals(self) -> list[tuple[str, str, float]]:
        self._read_new()
        return [a for a in self._seen.values() if a is not None]

    def reset(self) -> None:
        """Count from now on: what is in the Inboxes already (the warm-up's) is left there, not
        counted (deleting a Mailyard copy would change what its duplicate detection sees)."""
        self._read_new()
        self._seen = dict.fromkeys(self._seen)
        self._count = 0

    # What run.inject asks of a site.
    def reset_arrivals(self) -> None:
        self.reset()

    def wait_arrivals(self, expected: int, timeout: float) -> list[tuple[str, str, float]]:
        with contextlib.suppress(Timeout):
            wait_until(lambda: self.count() >= expected, timeout=timeout, interval=0.1)
        return self.arrivals()

    def harness_pids(self) -> list[int]:
        return []  # nothing runs for it but the benchmark's own process
