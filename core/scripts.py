"""The Lua scripts in core/lua/, loaded once per Redis client."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import cache
from importlib.resources import files
from typing import Any

import redis
import redis.asyncio
from redis.commands.core import AsyncScript, Script
from redis.exceptions import NoScriptError


@cache
def _source(name: str) -> str:
    return files("mailyard").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


_scripts: dict[tuple[int, str], Script] = {}


def script(r: redis.Redis, name: str) -> Script:
    """A callable script bound to ``r`` (EVALSHA, falling back to EVAL after a restart)."""
    key = (id(r), name)
    found = _scripts.get(key)
    if found is None:
        found = _scripts[key] = r.register_script(_source(name))
    return found


_async_scripts: dict[tuple[int, str], AsyncScript] = {}


def script_async(r: redis.asyncio.Redis, name: str) -> AsyncScript:
    key = (id(r), name)
    found = _async_scripts.get(key)
    if found is None:
        found = _async_scripts[key] = r.register_script(_source(name))
    return found


# A pipeline's scripts are loaded (SCRIPT EXISTS, SCRIPT LOAD) before it is sent. A failover in
# between, or one that redis-py's retry rides out while sending, runs it on the new primary,
# whose script cache is empty (scripts are not replicated): NOSCRIPT. Built and sent once more,
# it loads them there. A repeat is harmless: what ran had no scripts, every transaction guards.

def execute(r: redis.Redis, fill: Callable[[redis.client.Pipeline], None]) -> list[Any]:
    """A non-transactional pipeline that ``fill`` fills, executed (again after a NOSCRIPT)."""
    for attempt in (1, 2):
        pipe = r.pipeline(transaction=False)
        fill(pipe)
        try:
            return pipe.execute()
        except NoScriptError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def execute_async(r: redis.asyncio.Redis, fill: Callable[[redis.asyncio.client.Pipeline], Awaitable[None]],
                        ) -> list[Any]:
    """``execute`` for asyncio, with ``raise_on_error=False``: errors come back as replies."""
    for attempt in (1, 2):
        pipe = r.pipeline(transaction=False)
        await fill(pipe)
        replies = await pipe.execute(raise_on_error=False)
        if attempt == 2 or not any(isinstance(x, NoScriptError) for x in replies):
            return replies
    raise AssertionError("unreachable")
