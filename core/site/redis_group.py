"""A replicated Redis under Sentinel on one machine: a primary, its replicas and three
Sentinels (``mailyard site up --redis-replicas N``; the tests' ``RedisGroup``).

What is decided here, for whoever starts the processes:

- **The commands.** Each data node runs like the single Redis of redis_server (loopback,
  AOF ``appendfsync`` as chosen, a password in a 0600 file), plus ``masterauth`` (a replica
  logs on to its primary with the same password) and ``min-replicas-to-write 1``: a primary
  that has lost every replica refuses writes (NOREPLICAS), so that an old primary cut off by
  a partition acknowledges nothing the new one will never see. Each Sentinel has its own
  directory and ``sentinel.conf`` (0600; Sentinel rewrites it as the group changes, so it is
  written only when missing), and the same password.
- **The role a node starts in** (``start_role``). A node that is not the primary starts as a
  replica of the current one. A node that the Sentinels still call primary starts as primary
  only if it has its data: one whose data is gone (its machine was lost) must not come back
  as an empty primary, which its replicas would copy, erasing everything. It waits until the
  Sentinels have promoted a replica (``Wait``), then starts as that one's replica. With no
  Sentinel answering (the whole group starting), the primary is the one the Sentinels'
  files last named, and for a new group node 0.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mailyard import redisconn
from mailyard.site import redis_server

SERVICE = "mailyard"
SENTINELS = 3
QUORUM = 2
SENTINEL_CONF = "sentinel.conf"
# How long a primary may be silent before the Sentinels call it down (Redis's example
# config: 30 s). On one machine's loopback a second of silence already means it is gone.
DOWN_AFTER_MS = 2000
FAILOVER_TIMEOUT_MS = 10_000
# A primary refuses writes unless a replica acknowledged within this many seconds.
MIN_REPLICAS_MAX_LAG_S = 10
# One try for each question to a member: redis-py's default retries a refused connection for
# ~5 s, and a member that is down (the primary just lost, the Sentinels not started) is an answer.
NO_RETRY = Retry(NoBackoff(), 0)


@dataclass(frozen=True)
class Primary:
    pass


@dataclass(frozen=True)
class ReplicaOf:
    host: str
    port: int


@dataclass(frozen=True)
class Wait:
    """Not now: say why (the supervisor tries again in a moment)."""

    reason: str


Role = Primary | ReplicaOf | Wait


@dataclass
class Layout:
    """Where each member of the group lives: ports and data directories."""

    root: Path  # <data>/redis: node-0/, node-1/..., sentinel-0/...
    node_ports: list[int]
    sentinel_ports: list[int]
    host: str = "127.0.0.1"
    service: str = SERVICE
    down_after_ms: int = DOWN_AFTER_MS
    failover_timeout_ms: int = FAILOVER_TIMEOUT_MS
    extra: dict[str, str] = field(default_factory=dict)

    def node_dir(self, i: int) -> Path:
        return self.root / f"node-{i}"

    def sentinel_dir(self, j: int) -> Path:
        return self.root / f"sentinel-{j}"

    def node_url(self, i: int, password: str | None) -> str:
        url = f"redis://{self.host}:{self.node_ports[i]}/0"
        return redisconn.with_password(url, password) if password else url

    def url(self, password: str | None, db: int = 0) -> str:
        """The Sentinel URL every client of the group uses."""
        return redisconn.sentinel_url([(self.host, p) for p in self.sentinel_ports], self.service, db, password)

    def node_of(self, host: str, port: int) -> int | None:
        if port in self.node_ports and host in (self.host, "localhost", "127.0.0.1", "::1"):
            return self.node_ports.index(port)
        return None


def node_command(layout: Layout, i: int, role: Primary | ReplicaOf, *, password: str, fsync: str = "always",
                 maxmemory: str | None = None, databases: int = 16) -> list[str]:
    """redis-server for node ``i`` in ``role`` (start it with ``umask=redis_server.UMASK``)."""
    args = redis_server.command(layout.node_dir(i), layout.node_ports[i], fsync=fsync, host=layout.host,
                                maxmemory=maxmemory, databases=databases, password=password,
                                masterauth=True)
    args += ["--min-replicas-to-write", "1", "--min-replicas-max-lag", str(MIN_REPLICAS_MAX_LAG_S),
             # A replica that (re)joins is copied at once: Redis's default waits 5 s for others
             # to share the transfer, 5 s in which a primary with one replica refuses writes.
             "--repl-diskless-sync-delay", "0"]
    if isinstance(role, ReplicaOf):
        args += ["--replicaof", role.host, str(role.port)]
    return args


def sentinel_command(layout: Layout, j: int, *, password: str, binary: str | None = None) -> list[str]:
    """redis-server --sentinel for Sentinel ``j``. Its sentinel.conf is written when missing,
    naming as primary the one ``start_role`` would pick for a group that is not running."""
    d = layout.sentinel_dir(j)
    redis_server.make_data_dir(d)
    conf = d / SENTINEL_CONF
    if not conf.exists():
        primary = _last_known_primary(layout)
        pw = redis_server.conf_string(password)
        s = layout.service
        text = (
            "# Written by Mailyard when this Sentinel first started; Sentinel rewrites it since.\n"
            f"port {layout.sentinel_ports[j]}\nbind {layout.host}\ndir {d.resolve()}\n"
            "daemonize no\nlogfile \"\"\n"
            f"requirepass {pw}\n"
            f"sentinel monitor {s} {layout.host} {layout.node_ports[primary]} {QUORUM}\n"
            f"sentinel auth-pass {s} {pw}\n"
            f"sentinel down-after-milliseconds {s} {layout.down_after_ms}\n"
            f"sentinel failover-timeout {s} {layout.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {s} 1\n"
        )
        tmp = d / f".{SENTINEL_CONF}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, conf)
    return [binary or redis_server.find_binary(), str(conf.resolve()), "--sentinel"]


def has_data(layout: Layout, i: int) -> bool:
    """Whether node ``i`` has an AOF to load (Redis 7: appendonlydir/; 6.2: appendonly.aof)."""
    d = layout.node_dir(i)
    aof_dir = d / "appendonlydir"
    if aof_dir.is_dir() and any(p.stat().st_size > 0 for p in aof_dir.iterdir() if p.is_file()):
        return True
    single = d / "appendonly.aof"
    return single.is_file() and single.stat().st_size > 0


def ask_sentinels(layout: Layout, password: str | None) -> tuple[str, int] | None:
    """The primary's address as the first Sentinel that answers has it, or None."""
    for port in layout.sentinel_ports:
        client = redis.Redis(host=layout.host, port=port, password=password or None, socket_timeout=1,
                             socket_connect_timeout=1, retry=NO_RETRY)
        try:
            reply = client.execute_command("SENTINEL", "get-master-addr-by-name", layout.service)
        except redis.RedisError:
            continue
        finally:
            client.close()
        if reply:
            return redisconn.text(reply[0]), int(reply[1])
    return None


def _last_known_primary(layout: Layout) -> int:
    for j in range(len(layout.sentinel_ports)):
        try:
            lines = (layout.sentinel_dir(j) / SENTINEL_CONF).read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            words = line.split()
            if words[:3] == ["sentinel", "monitor", layout.service] and len(words) >= 5:
                found = layout.node_of(words[3], int(words[4]))
                if found is not None:
                    return found
    return 0


def start_role(layout: Layout, i: int, password: str | None) -> Role:
    """The role node ``i`` must start in now (see the module's docstring)."""
    known = ask_sentinels(layout, password)
    if known is None:
        primary = _last_known_primary(layout)
        if primary == i:
            return Primary()
        return ReplicaOf(layout.host, layout.node_ports[primary])
    if layout.node_of(*known) == i:
        if has_data(layout, i) or not any(has_data(layout, k) for k in range(len(layout.node_ports)) if k != i):
            return Primary()
        return Wait(f"node {i} lost its data and the Sentinels still name it primary: waiting for them "
                    "to promote a replica, so that an empty primary does not erase the replicas")
    return ReplicaOf(*known)


def replication(url: str) -> dict[str, str]:
    """``INFO replication`` of one node (``role``: master or slave, ...), or {} if it does not answer."""
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1, retry=NO_RETRY)
    try:
        return redisconn.text_map(client.info("replication"))
    except redis.RedisError:
        return {}
    finally:
        client.close()
