"""Postfix's own load tools, when installed: ``smtp-source`` injects, ``smtp-sink`` receives.

They are C programs that cost almost no CPU per message, so on a 2-core machine the figures
measure the MTA, not the harness. ``smtp-sink`` dumps each transaction to its own file; the
file's headers name the message (``Message-Id``, or ``X-Bench-Id`` for the Python load's
paced latency runs) and the recipient, and its modification time is the arrival."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

SOURCE = shutil.which("smtp-source") or ("/usr/sbin/smtp-source" if os.path.exists("/usr/sbin/smtp-source") else None)
SINK = shutil.which("smtp-sink") or ("/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None)
BENCH_ID = re.compile(rb"^X-Bench-Id: (\S+)", re.MULTILINE | re.IGNORECASE)
MESSAGE_ID = re.compile(rb"^Message-Id: (\S+)", re.MULTILINE | re.IGNORECASE)
RCPT = re.compile(rb"^X-Rcpt-Args: <([^>]*)>", re.MULTILINE)


def available() -> bool:
    return bool(SOURCE and SINK)


class CSink:
    """``smtp-sink`` on host:port, dumping every transaction into ``directory``."""

    def __init__(self, host: str, port: int, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o777)  # smtp-sink drops to an unprivileged user before it writes
        for parent in directory.parents:
            if parent == Path("/tmp") or parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)
        command = [SINK or "smtp-sink", "-d", f"{directory}/%H%M%S.", f"{host}:{port}", "1000"]
        if os.geteuid() == 0:
            command[1:1] = ["-u", "nobody"]
        self.proc = subprocess.Popen(command)
        self._seen: dict[str, list[tuple[str, str, float]]] = {}
        self._count = 0

    def count(self) -> int:
        """How many recipients arrived so far (each dump file is read once)."""
        self._read_new()
        return self._count

    def arrivals(self) -> list[tuple[str, str, float]]:
        """(message id, recipient, arrival) for every recipient of every transaction so far."""
        self._read_new()
        return [arrival for arrivals in self._seen.values() for arrival in arrivals]

    def _read_new(self) -> None:
        for entry in os.scandir(self.directory):
            if entry.name in self._seen:
                continue
            with open(entry.path, "rb") as f:
                head = f.read(8192)
            ident = BENCH_ID.search(head) or MESSAGE_ID.search(head)
            if ident is None:  # still being written: read it on the next call
                continue
            mtime = entry.stat().st_mtime
            self._seen[entry.name] = [(ident.group(1).decode(), rcpt.decode(), mtime)
                                      for rcpt in RCPT.findall(head)]
            self._count += len(self._seen[entry.name])

    def reset(self) -> None:
        for entry in os.scandir(self.directory):
            os.unlink(entry.path)
        self._seen.clear()
        self._count = 0


def source(endpoints: list[tuple[str, int]], messages: int, size: int, sessions: int, recipients: int,
           sender: str, recipient: str) -> tuple[float, int]:
    """Run one ``smtp-source`` per endpoint in parallel (one connection per message, as
    ``smtp-source`` does without ``-d``); returns the wall time and how many failed."""
    per = messages // len(endpoints)
    start = time.monotonic()
    procs = [subprocess.Popen(
        [SOURCE or "smtp-source", "-s", str(max(1, sessions // len(endpoints))), "-l", str(size), "-m", str(per),
         "-r", str(recipients), "-f", sender, "-t", recipient, f"{host}:{port}"],
        stderr=subprocess.PIPE, text=True) for host, port in endpoints]
    failed = 0
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            failed += 1
            print(f"smtp-source: {err.strip()[:300]}", flush=True)
    return time.monotonic() - start, failed
