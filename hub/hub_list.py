"""The hubs of every site as an operator sees them (Get-TransportServer): ``mailyard hub
list`` and the Queue Viewer's ``/api/hubs`` show the same rows.

A hub is alive while its heartbeat (each second, ``my:hubs``) is younger than the
organization's ``hub_heartbeat_timeout``; its concurrency is its pool's worker processes;
the back pressure is its site's (``my:pressure:<site>``, set by the
sweeper), with the resources above Normal that set it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from mailyard import keys, registry
from mailyard.hub.pressure import Level
from mailyard.redisconn import number, text_map

DEFAULT_HEARTBEAT_TIMEOUT_S = 5.0


def _iso(ms: int) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) if ms else None


def site_pressure(r: redis.Redis, sites: list[str]) -> dict[str, dict[str, Any]]:
    """Per site: its back pressure level's name and the resources above Normal."""
    pipe = r.pipeline(transaction=False)
    for site in sites:
        pipe.hgetall(keys.pressure(site))
    out = {}
    for site, raw in zip(sites, pipe.execute() if sites else [], strict=True):
        data = text_map(raw)
        try:
            resources = {k: Level(v).name.title() for k, v in json.loads(data.get("resources") or "{}").items()}
        except (ValueError, TypeError):
            resources = {}
        out[site] = {"level": Level(number(data.get("level"), default=Level.NORMAL)).name.title(),
                     "under_pressure": sorted(k for k, v in resources.items() if v != "Normal")}
    return out


def hub_rows(r: redis.Redis, heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S) -> list[dict[str, Any]]:
    """Every hub that ever sent a heartbeat and has not said goodbye, by site and name."""
    hubs = sorted(registry.hubs(r), key=lambda h: (h.site, h.name))
    pressure = site_pressure(r, sorted({h.site for h in hubs}))
    now = registry.now_ms()
    return [
        {"name": h.name, "site": h.site, "alive": h.alive(heartbeat_timeout_s, now), "version": h.version,
         "concurrency": h.concurrency, "host": h.host, "pid": h.pid, "started": _iso(h.started),
         "heartbeat": _iso(h.heartbeat), "heartbeat_age_seconds": round(max(0, now - h.heartbeat) / 1000, 1),
         "back_pressure": pressure[h.site]["level"], "under_pressure": pressure[h.site]["under_pressure"],
         "endpoints": h.endpoints}
        for h in hubs
    ]
