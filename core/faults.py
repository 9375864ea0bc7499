"""Crash points for tests: kill this process (or its whole hub) at a named step, once.

Disabled unless ``MAILYARD_FAULTS`` is set, e.g. ``pickup.stored=hub,deliver.sent=child``.
``pill`` points instead kill every time they meet a message marked POISON-PILL.
``child`` kills the process running the step (a Celery pool child), ``hub`` also kills its
parent (the worker's main process). Each point fires once per Redis database (a key in
Redis records that it fired), so the restarted worker carries on normally. This is how
the tests SIGKILL a hub in the middle of pickup, categorization and delivery, exactly
where it hurts most.
"""

from __future__ import annotations

import os
import signal

import redis

from mailyard import keys

ENV = "MAILYARD_FAULTS"


def _points() -> dict[str, str]:
    spec = os.environ.get(ENV, "")
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, mode = part.partition("=")
        out[name] = mode or "child"
    return out


_POINTS = _points()


PILL = "POISON-PILL"


def pill(name: str, text: str) -> None:
    """Die here, every time, while handling a message whose ``text`` contains POISON-PILL
    (a message that crashes its worker, as a poison message does)."""
    if _POINTS and name in _POINTS and PILL in text:
        if _POINTS[name] == "hub":
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def point(name: str, r: redis.Redis) -> None:
    """Die here if the fault ``name`` is armed and has not fired yet."""
    if not _POINTS or name not in _POINTS:
        return
    if not r.set(keys.fault(name), os.getpid(), nx=True):
        return
    if _POINTS[name] == "hub":
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
