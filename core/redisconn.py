"""Redis connections: one place that sets timeouts, retries and health checks."""

from __future__ import annotations

import os

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

ENV_URL = "MAILYARD_REDIS_URL"

# A command that cannot reach Redis is retried briefly (a restart, a dropped connection)
# before the caller sees the error; callers treat that error as "try again later".
_KW = dict(
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
        **_KW,  # type: ignore[arg-type]
    )


def url_from_env(default: str | None = None) -> str | None:
    return os.environ.get(ENV_URL, default)
