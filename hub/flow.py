"""Mail flow over time: per minute, per site and per next hop, for the last 24 hours.

Every hub counts as it writes its tracking records (``mailyard.tracking.flow_field``, into the
minute's ``my:flow:raw``). The sweeper samples queue depth there once a minute and rolls each
closed minute up into ``my:flow:<minute>``: per-site totals, the minute's busiest next hops by
name and the rest summed as ``(other)``, zeros left out. So a day costs 1,440 small hashes
whatever the number of destinations: 4.5 MB with two sites and 500 next hops busy every minute
(measured by tests/hub/test_flow.py). Readers (the Queue
Viewer's ``/api/flow``) take the minutes not rolled up yet from their raw counts: what was sent
a moment ago is in the picture at once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import redis

from mailyard import keys, registry
from mailyard.hub.redis_queues import RedisQueues
from mailyard.redisconn import number, text_map, texts
from mailyard.tracking import FLOW_RAW_TTL_S

METRICS = ("received", "delivered", "deferred", "failed", "depth")
EVENT_METRIC = {"RECEIVE": "received", "DELIVER": "delivered", "SEND": "delivered", "DEFER": "deferred",
                "FAIL": "failed", "DEPTH": "depth"}
TOP_HOPS = 20  # next hops kept by name, per minute and per answer
OTHER = "(other)"
UNKNOWN = "(unknown)"  # the site of a hub that is gone before its minute was rolled up
KEEP_S = 25 * 3600
WINDOW_MINUTES = 24 * 60
GRACE_MINUTES = 1  # a minute is rolled up once the next has ended too (hubs' clocks differ a little)
CATCH_UP_MINUTES = 150  # a sweeper back after a while rolls up this much (raw counts expire after 3 h)
SAMPLED = "sampled"  # the raw field that says the minute's depth was sampled


def minute_of(ms: float) -> int:
    return int(ms // 60_000)


def summarize(raw: Mapping[str, int], hub_sites: Mapping[str, str], top: int = TOP_HOPS) -> dict[str, int]:
    """A minute's raw counts as its rolled-up fields (``<site>|<metric>``, ``<hop>|<metric>``)."""
    sites: Counter[tuple[str, str]] = Counter()
    hops: Counter[tuple[str, str]] = Counter()
    for name, count in raw.items():
        event, _, where = name.partition("|")
        metric = EVENT_METRIC.get(event)
        if metric is None or not count:
            continue
        if where.startswith("@"):  # (by hub: a site total only)
            sites[(hub_sites.get(where[1:], UNKNOWN), metric)] += count
            continue
        site, sep, _ = where.partition("\\")
        sites[(site if sep else UNKNOWN, metric)] += count
        hops[(where, metric)] += count
    out = {f"{site}|{metric}": n for (site, metric), n in sites.items()}
    for (hop, metric), n in _folded(hops, top).items():
        out[f"{hop}|{metric}"] = n
    return out


def _folded(hops: Counter[tuple[str, str]], top: int) -> Counter[tuple[str, str]]:
    """The ``top`` busiest next hops (by all their counts) as they are, the rest per site as ``(other)``."""
    volume: Counter[str] = Counter()
    for (hop, _), n in hops.items():
        volume[hop] += n
    keep = {hop for hop, _ in sorted(volume.items(), key=lambda kv: (-kv[1], kv[0]))[:top]}
    out: Counter[tuple[str, str]] = Counter()
    for (hop, metric), n in hops.items():
        out[(hop if hop in keep else f"{hop.partition(chr(92))[0]}\\{OTHER}", metric)] += n
    return out


def _ints(mapping: object) -> dict[str, int]:
    return {k: number(v) for k, v in text_map(mapping).items()}


class Recorder:
    """The sweeper's part: sample depth once a minute, roll closed minutes up (``tick``)."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self._hub_sites: dict[str, str] = {}  # (hubs stay known after their registry entry is gone)

    def tick(self, now_ms: int) -> int:
        """Returns the number of minutes rolled up."""
        self.sample_depth(now_ms)
        return self.roll_up(now_ms)

    def sample_depth(self, now_ms: int) -> bool:
        """Queue depth per next hop, the first time in this minute (False: sampled already)."""
        raw = keys.flow_raw(minute_of(now_ms))
        if not self.r.hsetnx(raw, SAMPLED, 1):
            return False
        names = texts(self.r.zrange(keys.QUEUES, 0, -1))
        depth = {f"DEPTH|{q.identity}": q.message_count
                 for q in (RedisQueues.reader(self.r).queues(names) if names else []) if q.message_count}
        pipe = self.r.pipeline(transaction=True)
        if depth:
            pipe.hset(raw, mapping=depth)  # type: ignore[arg-type]
        pipe.expire(raw, FLOW_RAW_TTL_S)
        pipe.execute()
        return True

    def hub_sites(self) -> dict[str, str]:
        self._hub_sites.update({h.name: h.site for h in registry.hubs(self.r)})
        return self._hub_sites

    def roll_up(self, now_ms: int) -> int:
        """Roll up every closed minute since the last (at most ``CATCH_UP_MINUTES``); returns
        how many had counts."""
        last_closed = minute_of(now_ms) - 1 - GRACE_MINUTES
        seen = self.r.get(keys.FLOW_ROLLED)
        first = last_closed - CATCH_UP_MINUTES + 1
        if seen is not None:
            first = max(first, number(seen) + 1)
        if first > last_closed:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for minute in range(first, last_closed + 1):
            pipe.hgetall(keys.flow_raw(minute))
        raws = [_ints(reply) for reply in pipe.execute()]
        sites = self.hub_sites() if any(raws) else {}
        done = 0
        for minute, raw in zip(range(first, last_closed + 1), raws, strict=True):
            if raw or minute == last_closed:  # (an empty minute has nothing to keep)
                fields = summarize(raw, sites)
                if not self._commit(minute, fields, seen):
                    return done  # another sweeper took over and did it
                seen, done = str(minute).encode(), done + bool(raw)
        return done

    def _commit(self, minute: int, fields: dict[str, int], seen: bytes | str | None) -> bool:
        with self.r.pipeline(transaction=True) as pipe:
            # (WATCHed: a sweeper that lost its lease midway writes nothing twice)
            pipe.watch(keys.FLOW_ROLLED)
            if pipe.get(keys.FLOW_ROLLED) != seen:
                return False
            pipe.multi()
            if fields:
                pipe.hset(keys.flow(minute), mapping=fields)  # type: ignore[arg-type]
                pipe.expire(keys.flow(minute), KEEP_S)
            pipe.delete(keys.flow_raw(minute))
            pipe.set(keys.FLOW_ROLLED, minute)
            try:
                pipe.execute()
            except redis.WatchError:
                return False
        return True


@dataclass
class Flow:
    """What ``/api/flow`` answers: a value per minute (``minutes``: their starts, seconds since
    1970) of each metric, per site and per next hop (the busiest ``TOP_HOPS`` by name)."""

    minutes: list[int]
    sites: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    hops: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"minutes": self.minutes, "metrics": list(METRICS), "sites": self.sites, "hops": self.hops}


def read(r: redis.Redis, now_ms: int, minutes: int = 60, *, sites: Iterable[str] = (),
         hub_sites: Mapping[str, str] | None = None) -> Flow:
    """The last ``minutes`` (up to the one now, counted so far). ``sites``: shown even when idle."""
    last = minute_of(now_ms)
    span = list(range(last - minutes + 1, last + 1))
    pipe = r.pipeline(transaction=False)
    for minute in span:
        pipe.hgetall(keys.flow(minute))
        pipe.hgetall(keys.flow_raw(minute))
    replies = pipe.execute()
    if hub_sites is None:
        hub_sites = {h.name: h.site for h in registry.hubs(r)}
    per_minute = []
    for i in range(len(span)):
        rolled, raw = _ints(replies[2 * i]), _ints(replies[2 * i + 1])
        per_minute.append(rolled or summarize(raw, hub_sites))
    flow = Flow(minutes=[m * 60 for m in span])
    hop_totals: Counter[str] = Counter()
    site_names = set(sites)
    for fields in per_minute:
        for name, n in fields.items():
            where = name.rpartition("|")[0]
            if "\\" in where:
                hop_totals[where] += n
            else:
                site_names.add(where)
    keep = {hop for hop, _ in sorted(hop_totals.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_HOPS]}

    def series(table: dict[str, dict[str, list[int]]], name: str) -> dict[str, list[int]]:
        if name not in table:
            table[name] = {metric: [0] * len(span) for metric in METRICS}
        return table[name]

    for site in site_names:
        series(flow.sites, site)
    for i, fields in enumerate(per_minute):
        for name, n in fields.items():
            where, _, metric = name.rpartition("|")
            if metric not in METRICS:
                continue
            if "\\" not in where:
                series(flow.sites, where)[metric][i] += n
                continue
            hop = where if where in keep else f"{where.partition(chr(92))[0]}\\{OTHER}"
            series(flow.hops, hop)[metric][i] += n
    flow.sites = dict(sorted(flow.sites.items()))
    flow.hops = dict(sorted(flow.hops.items()))
    return flow
