"""Redis connections: one place that sets timeouts, retries and health checks; the Redis
password in URLs (``redis://:PASSWORD@host:port/db``); and the typed reading of replies.

Every Redis Mailyard starts has a password. It travels in the URL, which is therefore a
secret: pass it in the environment (``MAILYARD_REDIS_URL``), never on a command line, and
show it only through ``redacted`` (``redis://:**@host:port/0``, as Celery's banner does).
A URL without a password takes the one in the file named by ``MAILYARD_REDIS_PASSWORD_FILE``
(as docker compose runs it), see ``with_password_file``.

Mailyard's clients do not decode replies (message bodies are bytes), and redis-py types
every reply as "bytes or str or ...". The functions at the bottom turn a reply into what
the caller knows it is, so no module calls ``.decode()`` on an untyped value. Text is
UTF-8, undecodable bytes replaced; a message body is the one reply read as bytes
(``RedisQueues.bodies``).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypedDict, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from mailyard.errors import SiteError

T = TypeVar("T")

ENV_URL = "MAILYARD_REDIS_URL"
ENV_PASSWORD_FILE = "MAILYARD_REDIS_PASSWORD_FILE"
MASK = "**"

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


def _not_a_refused_logon(is_retryable: Callable[[Exception], bool] | None) -> Callable[[Exception], bool]:
    # redis-py's AuthenticationError (NOAUTH, WRONGPASS) is a ConnectionError: trying again
    # cannot help, and would keep the caller waiting for half a minute before it hears why.
    def retryable(error: Exception) -> bool:
        return not isinstance(error, redis.AuthenticationError) and (is_retryable is None or is_retryable(error))

    return retryable


class _Retry(Retry):
    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> T:
        return super().call_with_retry(do, fail, _not_a_refused_logon(is_retryable), with_failure_count)


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        retry=_Retry(ExponentialBackoff(cap=1.0, base=0.05), 6),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        **_KW,
    )


def connect_async(url: str) -> redis.asyncio.Redis:
    from redis.asyncio.retry import Retry as AsyncRetry

    class _AsyncRetry(AsyncRetry):
        async def call_with_retry(self, do: Callable[[], Awaitable[T]], fail: Callable[..., Any],
                                  is_retryable: Callable[[Exception], bool] | None = None,
                                  with_failure_count: bool = False) -> T:
            return await super().call_with_retry(do, fail, _not_a_refused_logon(is_retryable), with_failure_count)

    return redis.asyncio.Redis.from_url(
        url,
        retry=_AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), 6),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        **_KW,
    )


def url_from_env(default: str | None = None) -> str | None:
    """``MAILYARD_REDIS_URL`` (or ``default``), with the password of ``MAILYARD_REDIS_PASSWORD_FILE``
    where it has none."""
    url = os.environ.get(ENV_URL) or default
    return with_password_file(url) if url else url


# region: passwords in URLs


def _userinfo(url: str) -> tuple[str, str | None, str]:
    """(scheme://, userinfo or None, the rest) of a Redis URL, without decoding anything."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", None, url
    netloc_end = len(rest)
    for stop in "/?#":
        i = rest.find(stop)
        if i != -1:
            netloc_end = min(netloc_end, i)
    netloc, tail = rest[:netloc_end], rest[netloc_end:]
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        return scheme + sep, None, rest
    return scheme + sep, userinfo, hostport + tail


def has_password(url: str) -> bool:
    """True when the URL carries a password (``redis://:pw@…``, ``redis://user:pw@…``, ``?password=``)."""
    _, userinfo, _ = _userinfo(url)
    if userinfo is not None and userinfo.partition(":")[2]:
        return True
    query = urlsplit(url).query
    return any(k == "password" and v for k, v in parse_qsl(query, keep_blank_values=True))


def password_of(url: str) -> str | None:
    """The password in a Redis URL (decoded, as redis-py reads it), or None."""
    if not has_password(url):
        return None
    parts = urlsplit(url)
    if parts.password:
        return unquote(parts.password)
    return dict(parse_qsl(parts.query)).get("password") or None


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` in it (a URL that has one already is returned as it is)."""
    if has_password(url):
        return url
    prefix, userinfo, rest = _userinfo(url)
    if not prefix:
        raise ValueError("not a Redis URL (scheme://...)")
    user = (userinfo or "").partition(":")[0]
    return f"{prefix}{user}:{quote(password, safe='')}@{rest}"


def without_password(url: str) -> str:
    """``url`` with its password taken out (to keep or show where the password must not be)."""
    prefix, userinfo, rest = _userinfo(url)
    if userinfo is not None:
        user = userinfo.partition(":")[0]
        url = f"{prefix}{user + '@' if user else ''}{rest}"
    parts = urlsplit(url)
    if "password" in {k for k, _ in parse_qsl(parts.query, keep_blank_values=True)}:
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"])
        url = urlunsplit(parts._replace(query=query))
    return url


def redacted(url: str) -> str:
    """``url`` as it may be logged or printed: its password, if any, shown as ``**``."""
    if not url or not has_password(url):
        return url
    prefix, userinfo, rest = _userinfo(url)
    if userinfo is not None and userinfo.partition(":")[2]:
        url = f"{prefix}{userinfo.partition(':')[0]}:{MASK}@{rest}"
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "password" for k, _ in pairs):
        query = urlencode([(k, MASK if k == "password" else v) for k, v in pairs], safe="*")
        url = urlunsplit(parts._replace(query=query))
    return url


def read_password_file(path: str | os.PathLike[str]) -> str:
    """The password in a file (its first line, without the line end)."""
    try:
        with open(path, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except OSError as exc:
        raise SiteError(f"cannot read the Redis password file {path} ({ENV_PASSWORD_FILE}): "
                        f"{exc.strerror or exc}") from None
    if not password:
        raise SiteError(f"the Redis password file {path} ({ENV_PASSWORD_FILE}) is empty")
    return password


def with_password_file(url: str) -> str:
    """``url`` with the password of the file ``MAILYARD_REDIS_PASSWORD_FILE`` names, when it is set and
    the URL has no password of its own."""
    path = os.environ.get(ENV_PASSWORD_FILE)
    if not path or has_password(url):
        return url
    return with_password(url, read_password_file(path))


def refused(url: str, exc: Exception, hint: str | None = None) -> str:
    """One line for a Redis that refused our logon (NOAUTH, WRONGPASS...): what and what to do,
    never the password (redis-py's own texts speak of HELLO and AUTH)."""
    text = str(exc)
    if "WRONGPASS" in text or "invalid username-password" in text or "invalid password" in text:
        what, default = "wrong password", "the password given is not this Redis's"
    elif "without any password configured" in text or "no password is set" in text:
        what, default = "it has no password, and one was given", "leave the password out"
    else:
        what = "it requires a password"
        default = ("the local site's is in its data directory's secrets.toml ([redis] password, readable by "
                   "the site's operator only); elsewhere put it in the URL (redis://:PASSWORD@host:port/0) "
                   f"or name a file holding it in {ENV_PASSWORD_FILE}")
    where = f"Redis at {redacted(url)}" if url else "Redis"
    return f"{where} refused the connection: {what}; {hint or default}"


# endregion


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
