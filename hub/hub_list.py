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
from mailyard.errors import NotFoundError
from mailyard.hub.pressure import Level
from mailyard.org import Organization
from mailyard.redisconn import number, text, text_map

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


def open_sessions(r: redis.Redis, hubs: list[str]) -> dict[str, dict[str, int]]:
    """hub -> receive connector -> SMTP sessions open now (``my:sessions:<hub>``)."""
    pipe = r.pipeline(transaction=False)
    for name in hubs:
        pipe.hgetall(keys.sessions(name))
    return {name: {k: number(v) for k, v in text_map(raw).items()}
            for name, raw in zip(hubs, pipe.execute() if hubs else [], strict=True)}


def in_flight(r: redis.Redis) -> dict[str, int]:
    """hub -> items its workers hold a lease on now (``my:inflight``, each item's ``hub``)."""
    items = r.zrange(keys.INFLIGHT, 0, -1)
    pipe = r.pipeline(transaction=False)
    for item in items:
        pipe.hget(keys.item(text(item)), "hub")
    held: dict[str, int] = {}
    for hub in pipe.execute() if items else []:
        if hub:
            held[text(hub)] = held.get(text(hub), 0) + 1
    return held


def hub_detail(r: redis.Redis, name: str, org: Organization,
               heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S) -> dict[str, Any]:
    """One hub's page: its row of ``hub_rows``, the items in flight on it, and the receive
    connectors of its site with the sessions open on each (NotFoundError if no such hub)."""
    row = next((h for h in hub_rows(r, heartbeat_timeout_s) if h["name"] == name), None)
    if row is None:
        raise NotFoundError(f"no hub {name!r} (mailyard hub list shows the hubs)")
    sessions = open_sessions(r, [name])[name] if row["alive"] else {}
    connectors = []
    for conn in org.receive_connectors:
        if conn.sites and row["site"] not in conn.sites:
            continue
        connectors.append({"name": conn.name, "enabled": conn.enabled, "bindings": conn.bindings,
                           "listening": row["endpoints"].get(conn.name, ""),
                           "permission_groups": [str(g) for g in conn.permission_groups],
                           "open_sessions": sessions.get(conn.name, 0),
                           "max_inbound_connection": conn.max_inbound_connection})
    return {**row, "in_flight": in_flight(r).get(name, 0), "receive_connectors": connectors}


def connector_rows(r: redis.Redis, org: Organization) -> dict[str, list[dict[str, Any]]]:
    """The organization's send and receive connectors with their settings (a smart host's
    password only as whether one is set), receive connectors with the sessions open on each
    hub now."""
    hubs = [h.name for h in registry.hubs(r)]
    sessions = open_sessions(r, hubs)
    send = []
    for conn in org.send_connectors:
        data = conn.model_dump(mode="json", exclude={"smart_host_password"})
        data["smart_host_password_set"] = bool(conn.smart_host_password)
        send.append(data)
    receive = []
    for rc in org.receive_connectors:
        data = rc.model_dump(mode="json")
        per_hub = {hub: n for hub in hubs if (n := sessions[hub].get(rc.name, 0))}
        data["open_sessions"] = {"total": sum(per_hub.values()), "by_hub": per_hub}
        receive.append(data)
    return {"send": send, "receive": receive}
