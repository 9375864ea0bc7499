"""Redis connections: one place that sets timeouts, retries and health checks; and the
typed reading of their replies.

Mailyard's clients do not decode replies (message bodies are bytes), and redis-py types
every reply as "bytes or str or ...". The functions at the bottom turn a reply into what
the caller knows it is, so no module calls ``.decode()`` on an untyped value. Text is
UTF-8, undecodable bytes replaced; a message body is the one reply read as bytes
(``RedisQueues.bodies``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypedDict

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

ENV_URL = "MAILYARD_REDIS_URL"

class _Options(TypedDict):
    socket_timeout: float
    socket_connect_timeout: float
    socket_keepalive: bool
    health_check_interval: int


# A command that cannot reach Redis is retried briefly (a restart, a dropped connection)
# before the caller sees the error; callers treat that error as "try again later".
_KW = _Options(
    socket_timeout=15,
    socket_connect_timeout=5,
    socket_keepalive=True,
    health_check_interval=10,
)


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 6),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        **_KW,
    )


def connect_async(url: str) -> redis.asyncio.Redis:
    from redis.asyncio.retry import Retry as AsyncRetry

    return redis.asyncio.Redis.from_url(
        url,
        retry=AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), 6),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        **_KW,
    )


def url_from_env(default: str | None = None) -> str | None:
    return os.environ.get(ENV_URL, default)


# region: replies


def text(value: Any) -> str:
    """A string reply (or None: ""), as text."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def text_or_none(value: Any) -> str | None:
    """A string reply that may be absent (GET of a missing key), as text or None."""
    return None if value is None else text(value)


def texts(values: Any) -> list[str]:
    """A list reply (LRANGE, ZRANGE, SMEMBERS, ...), as text."""
    return [text(v) for v in values or ()]


def text_map(mapping: Any) -> dict[str, str]:
    """A hash reply (HGETALL), as text."""
    return {text(k): text(v) for k, v in (mapping or {}).items()}


def flat_text_map(flat: Any) -> dict[str, str]:
    """A hash as a script returns it (``[field, value, field, value, ...]``), as text."""
    values = texts(flat)
    return dict(zip(values[::2], values[1::2], strict=True))


def scored(pairs: Iterable[Any]) -> list[tuple[str, float]]:
    """A ``withscores=True`` reply: (member, score) pairs."""
    return [(text(m), float(s)) for m, s in pairs]


def number(value: Any, default: int = 0) -> int:
    """An integer reply, or a string holding one (None: ``default``)."""
    if value is None or value == b"" or value == "":
        return default
    return int(value)


# endregion
