"""Run an asyncio service on its own event loop in a thread, for synchronous callers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")

START_TIMEOUT = 10.0


class LoopThread:
    """An event loop running forever in a daemon thread until ``stop()``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = START_TIMEOUT) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(START_TIMEOUT)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()


class Service:
    """A server with an async life cycle (``open``/``close``, ``async with``) and a threaded
    one for synchronous code (``start``/``stop``, ``with``). Subclasses implement
    ``_open`` and ``_close``; both run on the service's loop."""

    _thread_name = "service"

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: LoopThread | None = None

    async def _open(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    async def open(self) -> None:
        """Start serving on the running loop."""
        self._loop = asyncio.get_running_loop()
        try:
            await self._open()
        except BaseException:
            self._loop = None
            raise

    async def close(self) -> None:
        """Stop serving and drop every open connection."""
        if self._loop is not None:
            try:
                await self._close()
            finally:
                self._loop = None

    def start(self) -> Self:
        """Start serving on a new event loop in a background thread."""
        if self._thread is not None:
            raise RuntimeError(f"{self!r} is already started")
        thread = LoopThread(self._thread_name)
        thread.start()
        try:
            thread.run(self.open())
        except BaseException:
            thread.stop()
            raise
        self._thread = thread
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            try:
                thread.run(self.close())
            finally:
                thread.stop()

    @property
    def running(self) -> bool:
        return self._loop is not None

    def _in_loop(self, fn: Callable[[], T]) -> T | None:
        """Call ``fn`` on the service's loop: now when called from it, else wait for it there.
        Not running: do nothing (``open`` applies the current settings)."""
        loop = self._loop
        if loop is None:
            return None
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is loop:
            return fn()

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(START_TIMEOUT)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
