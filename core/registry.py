"""The registry of live nodes: hubs and mailbox servers announce themselves in Redis.

A hub heart-beats every second; the Mail Submission Service round-robins over the hubs of
its site whose last heartbeat is recent (``transport.hub_heartbeat_timeout``). Mailbox
servers register the URL of their HTTP API, which is how hubs and the CLI find them.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field

import redis
from redis.typing import EncodableT, FieldT

from mailyard import keys
from mailyard.errors import NotFoundError
from mailyard.redisconn import scored, text, text_map


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class HubInfo:
    name: str
    site: str
    host: str = ""
    pid: int = 0
    started: int = 0
    heartbeat: int = 0
    endpoints: dict[str, str] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)  # the hub's processes (worker and pool)
    version: str = ""  # Mailyard's version the hub runs
    concurrency: int = 0  # its pool's worker processes

    def alive(self, timeout_s: float, now: int | None = None) -> bool:
        return (now or now_ms()) - self.heartbeat <= timeout_s * 1000


def hub_heartbeat(
    r: redis.Redis, name: str, site: str, *, endpoints: dict[str, str] | None = None,
    started: int = 0, extra: dict[str, str] | None = None,
) -> None:
    fields: dict[FieldT, EncodableT] = {
        "site": site,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": started or now_ms(),
    }
    if endpoints is not None:
        fields["endpoints"] = json.dumps(endpoints)
    fields.update(extra or {})
    pipe = r.pipeline(transaction=True)
    pipe.hset(keys.hub(name), mapping=fields)
    pipe.zadd(keys.HUBS, {name: now_ms()})
    pipe.execute()


def hub_endpoints(r: redis.Redis, name: str, endpoints: dict[str, str]) -> None:
    """Where the hub's receive connectors listen: connector name -> "host:port"."""
    r.hset(keys.hub(name), "endpoints", json.dumps(endpoints))


def hub_gone(r: redis.Redis, name: str) -> None:
    r.zrem(keys.HUBS, name)


def hubs(r: redis.Redis) -> list[HubInfo]:
    beats = scored(r.zrange(keys.HUBS, 0, -1, withscores=True))
    if not beats:
        return []
    pipe = r.pipeline(transaction=False)
    for name, _ in beats:
        pipe.hgetall(keys.hub(name))
    out = []
    for (name, beat), data in zip(beats, pipe.execute(), strict=True):
        d = text_map(data)
        out.append(
            HubInfo(
                name=name,
                site=d.get("site", ""),
                host=d.get("host", ""),
                pid=int(d.get("pid", 0) or 0),
                started=int(d.get("started", 0) or 0),
                heartbeat=int(beat),
                endpoints=json.loads(d.get("endpoints") or "{}"),
                pids=json.loads(d.get("pids") or "[]"),
                version=d.get("version", ""),
                concurrency=int(d.get("concurrency", 0) or 0),
            )
        )
    return out


def live_hubs(r: redis.Redis, site: str, timeout_s: float) -> list[str]:
    """Names of the hubs of ``site`` that heart-beat within the timeout, sorted."""
    now = now_ms()
    return sorted(h.name for h in hubs(r) if h.site == site and h.alive(timeout_s, now))


def register_server(r: redis.Redis, name: str, url: str, site: str) -> None:
    pipe = r.pipeline(transaction=True)
    pipe.hset(
        keys.server(name),
        mapping={"url": url, "site": site, "pid": os.getpid(), "host": socket.gethostname()},
    )
    pipe.zadd(keys.SERVERS, {name: now_ms()})
    pipe.execute()


def server_url(r: redis.Redis, name: str) -> str:
    url = text(r.hget(keys.server(name), "url"))
    if not url:
        raise NotFoundError(f"mailbox server {name} has not registered its API yet")
    return url


def servers(r: redis.Redis) -> dict[str, dict[str, str]]:
    out = {}
    for name, beat in scored(r.zrange(keys.SERVERS, 0, -1, withscores=True)):
        data = text_map(r.hgetall(keys.server(name)))
        data["heartbeat"] = str(int(beat))
        out[name] = data
    return out
