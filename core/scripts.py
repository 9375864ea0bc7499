"""The Lua scripts in core/lua/, loaded once per Redis client."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

import redis
import redis.asyncio
from redis.commands.core import AsyncScript, Script


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
