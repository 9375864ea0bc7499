"""Wait for a condition by polling, with a generous deadline: never a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


# For a check that starts a process (the ``mailyard`` CLI costs about a second of CPU to start):
# polled every 50 ms, it keeps a core busy that the processes under test need.
PROCESS_POLL = 0.5


class Timeout(AssertionError):
    pass


def wait_until(
    check: Callable[[], T | None], *, timeout: float = 30.0, interval: float = 0.05,
    message: str | Callable[[], str] = "",
) -> T:
    """Call ``check`` until it returns something truthy; return that, or fail with ``message``.

    ``message`` may be a callable, evaluated at the deadline to describe the state then.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # the condition may fail while things start up
            last_error = exc
        if time.monotonic() > deadline:
            detail = message() if callable(message) else message
            suffix = f" (last error: {last_error!r})" if last_error else ""
            raise Timeout(f"not true after {timeout:.0f}s: {detail}{suffix}")
        time.sleep(interval)
