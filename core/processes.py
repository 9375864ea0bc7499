"""What every Mailyard process does the same way: log, and die with the process that started it."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from typing import Any


def setup_logging(level: str = "INFO") -> None:
    """One line per record on stderr, ``<time> <level> <logger>: <message>``."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # One line per task or HTTP request costs CPU at load and buries what matters.
    for noisy in ("celery.app.trace", "celery.worker.strategy", "httpx", "uvicorn.access", "mail.log"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    # Loops that retry every few milliseconds while Redis refuses writes (Celery's consumer
    # reconnecting; the sweeper, the heartbeat): each message once per 30 s, with a count.
    for looping in ("celery.worker.consumer.consumer", "celery.worker.consumer.connection", "mailyard.hub.sweeper"):
        logging.getLogger(looping).addFilter(Repeats(30.0))
    # Celery warns at every lost broker connection that the setting
    # worker_cancel_long_running_tasks_on_connection_loss will default to True in 6.0; the hub
    # sets it (False, on purpose: mailyard.broker), so the warning says nothing.
    logging.getLogger("py.warnings").addFilter(
        lambda record: "worker_cancel_long_running_tasks_on_connection_loss" not in record.getMessage())
    # aiosmtpd warns on every AUTH that its own code sets a deprecated attribute.
    logging.getLogger("mail.log").addFilter(lambda record: "login_data is deprecated" not in record.getMessage())


class Repeats(logging.Filter):
    """Lets a message through once per ``window`` seconds (by logger, level, the first line of
    its text and its exception's type); the next one after the window says how many were left
    out meanwhile."""

    def __init__(self, window: float) -> None:
        super().__init__()
        self.window = window
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        error = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        key = (record.name, record.levelno, f"{text.partition(chr(10))[0]} {error}")
        now = time.monotonic()
        first, left_out = self._seen.get(key, (-self.window, 0))
        if now - first < self.window:
            self._seen[key] = (first, left_out + 1)
            return False
        if left_out:
            record.msg, record.args = f"{text.rstrip()} ({left_out} more like it in the last {now - first:.0f} s)", None
        if len(self._seen) > 1000:  # (bounded: messages that differ every time)
            self._seen.clear()
        self._seen[key] = (now, 0)
        return True


def die_with_parent() -> None:
    """Runs in a child before exec (``preexec_fn``): SIGTERM it when its parent dies (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def serve_until_stopped(server: Any, sockets: list[Any]) -> None:
    """Run a ``uvicorn.Server`` on ``sockets`` until SIGTERM or SIGINT, then return, so that
    the caller's cleanup runs and the process ends with status 0. (uvicorn handles the signal,
    stops, and then raises it again for the handler it found: the default one would end the
    process by the signal, status 143, skipping the cleanup.)"""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=sockets)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def process_state(pid: int) -> str | None:
    """The state letter of a process (R, S, Z for a zombie, ...), None when there is none
    (or no /proc to read it from)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0]  # after "pid (comm)"
    except (OSError, IndexError):
        return None


def living_children(pid: int) -> list[int]:
    """The child processes of ``pid`` that have not exited, whichever of its threads started
    them. A child killed but not yet reaped (a zombie, for seconds under load) is not one.
    Empty where there is no /proc (not Linux)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                found += [int(p) for p in fh.read().split()]
        except OSError:  # a thread that ended meanwhile
            continue
    return [p for p in found if process_state(p) not in (None, "Z", "X")]
