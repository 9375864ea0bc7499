"""Redis connections: one place that sets timeouts, retries and health checks; the Redis
password in URLs (``redis://:PASSWORD@host:port/db``); and the typed reading of replies.

Every Redis Mailyard starts has a password. It travels in the URL, which is therefore a
secret: pass it in the environment (``MAILYARD_REDIS_URL``), never on a command line, and
show it only through ``redacted`` (``redis://:**@host:port/0``, as Celery's banner does).
A URL without a password takes the one in the file named by ``MAILYARD_REDIS_PASSWORD_FILE``
(as docker compose runs it), see ``with_password_file``.

A primary managed by Redis Sentinel has a URL of its own, the form of the redis-sentinel-url
convention (``SentinelURL``)::

    redis+sentinel://:PASSWORD@host1:26379,host2:26379,host3:26379/SERVICE/DB

the Sentinels (port 26379 unless given), the name they monitor the primary by, and the
database. The password is the data nodes' and the Sentinels' alike (``mailyard site up``
gives both the same one). Every client built here asks the Sentinels where the primary is,
and asks again when it cannot reach it or finds it demoted (READONLY), retrying long enough
to ride out a failover (``FAILOVER_RETRY_S``).

Mailyard's clients do not decode replies (message bodies are bytes), and redis-py types
every reply as "bytes or str or ...". The functions at the bottom turn a reply into what
the caller knows it is, so no module calls ``.decode()`` on an untyped value. Text is
UTF-8, undecodable bytes replaced; a message body is the one reply read as bytes
(``RedisQueues.bodies``).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypedDict, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from mailyard.errors import SiteError

T = TypeVar("T")

ENV_URL = "MAILYARD_REDIS_URL"
SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
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


# Behind Sentinel a command can meet a failover: the old primary gone (refused, timing out)
# or demoted (READONLY) until the Sentinels agree (their down-after time) and promote a
# replica, about a second later. Its retries go on this long before the caller sees the error.
FAILOVER_RETRY_S = 30.0
_BACKOFF_CAP_S = 1.0
_SENTINEL_KW = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}


def _retries(budget_s: float) -> int:
    """How many ExponentialBackoff(cap=1 s, base=50 ms) retries add up to ``budget_s``."""
    n, waited = 0, 0.0
    while waited < budget_s:
        n += 1
        waited += min(_BACKOFF_CAP_S, 0.05 * 2 ** n)
    return n


_PLAIN_RETRIES = 6
_FAILOVER_RETRIES = _retries(FAILOVER_RETRY_S)


@dataclass(frozen=True)
class SentinelURL:
    """A ``redis+sentinel://`` URL, parsed."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None

    def sentinel_kwargs(self) -> dict[str, Any]:
        auth = {k: v for k, v in (("username", self.username), ("password", self.password)) if v}
        return {**_SENTINEL_KW, **auth}

    def node_kwargs(self) -> dict[str, Any]:
        """What redis-py's ``master_for`` takes besides the service name (the data node's logon)."""
        auth = {k: v for k, v in (("username", self.username), ("password", self.password)) if v}
        return {"db": self.db, **auth}

    def kombu_url(self) -> str:
        """kombu's form of the same: ``sentinel://:pw@host:port/db`` per Sentinel, ``;``-joined
        (the service goes in the transport option ``master_name``)."""
        auth = ""
        if self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        elif self.username:
            auth = f"{quote(self.username, safe='')}@"
        return ";".join(f"sentinel://{auth}{_host(h)}:{p}/{self.db}" for h, p in self.sentinels)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def is_sentinel(url: str | None) -> bool:
    """True for a ``redis+sentinel://`` URL (a primary that Sentinels manage)."""
    return bool(url) and str(url).lower().startswith(SENTINEL_SCHEME + "://")


def parse_sentinel(url: str) -> SentinelURL:
    """Read a ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/SERVICE[/DB]`` URL.
    Raises SiteError naming what is wrong."""
    shown = redacted(url)
    if not is_sentinel(url):
        raise SiteError(f"not a Sentinel URL ({SENTINEL_SCHEME}://...): {shown}")
    _, userinfo, rest = _userinfo(url)
    hostlist, _, path = rest.partition("/")
    path = path.split("?", 1)[0].split("#", 1)[0]
    sentinels: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            raise SiteError(f"an empty Sentinel address in {shown}")
        if item.startswith("["):  # [IPv6]:port
            host, sep, tail = item[1:].partition("]")
            bad = not sep or bool(tail and not tail.startswith(":"))
            port_text = tail[1:]
        else:
            host, _, port_text = item.partition(":")
            bad = ":" in port_text
        if bad or not host:
            raise SiteError(f"bad Sentinel address {item!r} in {shown} (host, host:port or [IPv6]:port)")
        try:
            port = int(port_text) if port_text else SENTINEL_PORT
        except ValueError:
            raise SiteError(f"bad port in Sentinel address {item!r} in {shown}") from None
        if not 0 < port < 65536:
            raise SiteError(f"bad port in Sentinel address {item!r} in {shown}")
        sentinels.append((host, port))
    parts = [p for p in path.split("/") if p] if path else []
    if not parts:
        raise SiteError(f"a Sentinel URL names the monitored primary: {SENTINEL_SCHEME}://hosts/SERVICE/DB, "
                        f"not {shown}")
    if len(parts) > 2:
        raise SiteError(f"a Sentinel URL's path is /SERVICE or /SERVICE/DB, not /{'/'.join(parts)} ({shown})")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise SiteError(f"the database of a Sentinel URL is a number, not {parts[1]!r} ({shown})")
        db = int(parts[1])
    username = password = None
    if userinfo is not None:
        user, _, pw = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(pw) or None
    if password is None:
        password = password_of(url)
    return SentinelURL(tuple(sentinels), unquote(parts[0]), db, username, password)


def sentinel_url(sentinels: Iterable[tuple[str, int]], service: str, db: int = 0, password: str | None = None) -> str:
    """The ``redis+sentinel://`` URL of a primary that these Sentinels monitor as ``service``."""
    auth = f":{quote(password, safe='')}@" if password else ""
    hosts = ",".join(f"{_host(h)}:{p}" for h, p in sentinels)
    return f"{SENTINEL_SCHEME}://{auth}{hosts}/{quote(service, safe='')}/{db}"


class _FollowingConnection(redis.sentinel.SentinelManagedConnection):
    """A connection to a Sentinel-managed primary that asks the Sentinels where the primary is
    whenever it connects, a command's retry included. redis-py's own asks only when a
    connection is taken from the pool: a retry reconnects to the address it had, so a client
    whose primary went silent (a partition, not a refused connection) stayed on it for
    minutes after the failover (redis-py issue #3874)."""

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if not self.is_connected and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class _FollowingAsyncConnection(redis.asyncio.sentinel.SentinelManagedConnection):
    """``_FollowingConnection`` for asyncio."""

    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if not self.is_connected and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


def connect(url: str) -> redis.Redis:
    """A client of the Redis at ``url`` (``redis://``, ``rediss://``, ``unix://`` or a Sentinel URL)."""
    if is_sentinel(url):
        s = parse_sentinel(url)
        sentinel = redis.sentinel.Sentinel(list(s.sentinels), sentinel_kwargs=s.sentinel_kwargs())
        return sentinel.master_for(
            s.service, redis_class=redis.Redis, connection_class=_FollowingConnection,
            retry=_Retry(ExponentialBackoff(cap=_BACKOFF_CAP_S, base=0.05), _FAILOVER_RETRIES),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            **s.node_kwargs(), **_KW,
        )
    return redis.Redis.from_url(
        url,
        retry=_Retry(ExponentialBackoff(cap=_BACKOFF_CAP_S, base=0.05), _PLAIN_RETRIES),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        **_KW,
    )


def connect_async(url: str) -> redis.asyncio.Redis:
    """The asyncio client of the same."""
    from redis.asyncio.retry import Retry as AsyncRetry

    class _AsyncRetry(AsyncRetry):
        async def call_with_retry(self, do: Callable[[], Awaitable[T]], fail: Callable[..., Any],
                                  is_retryable: Callable[[Exception], bool] | None = None,
                                  with_failure_count: bool = False) -> T:
            return await super().call_with_retry(do, fail, _not_a_refused_logon(is_retryable), with_failure_count)

    if is_sentinel(url):
        s = parse_sentinel(url)
        sentinel = redis.asyncio.sentinel.Sentinel(list(s.sentinels), sentinel_kwargs=s.sentinel_kwargs())
        return sentinel.master_for(
            s.service, redis_class=redis.asyncio.Redis, connection_class=_FollowingAsyncConnection,
            retry=_AsyncRetry(ExponentialBackoff(cap=_BACKOFF_CAP_S, base=0.05), _FAILOVER_RETRIES),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            **s.node_kwargs(), **_KW,
        )
    return redis.asyncio.Redis.from_url(
        url,
        retry=_AsyncRetry(ExponentialBackoff(cap=_BACKOFF_CAP_S, base=0.05), _PLAIN_RETRIES),
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


def with_password_file(url: str, variable: str = ENV_PASSWORD_FILE) -> str:
    """``url`` with the password of the file ``MAILYARD_REDIS_PASSWORD_FILE`` (or ``variable``)
    names, when it is set and the URL has no password of its own."""
    path = os.environ.get(variable)
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
