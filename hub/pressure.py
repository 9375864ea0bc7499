"""Back pressure (Exchange 2010's resource monitor): refuse new mail before Redis fills up.

Three resources are watched per site: Redis memory (of ``maxmemory``), the Submission
queue's length, and the backlog (mail ready to go that no worker has taken yet). Each has
Normal, Medium and High thresholds with hysteresis, as in Exchange: a resource rises to
Medium at the Medium threshold and to High at the High one, and comes back down only below
the Normal threshold (from Medium) or below the Medium one (from High). The site's level is
the highest of them.

- Medium: receive connectors answer ``452 4.3.1 Insufficient system resources`` at MAIL
  FROM, except to the organization's own senders (authenticated, or from an accepted
  domain), whose mail keeps flowing.
- High: every new MAIL FROM gets 452 4.3.1, and the Mail Submission Service holds its
  pickup notifications (the mail waits in the Outboxes).
The sweeper computes the levels and stores them with a short expiry, so a dead sweeper can
never leave a site refusing mail.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from enum import IntEnum

import redis

from mailyard import keys
from mailyard.hub.records import QueueKind
from mailyard.hub.redis_queues import RedisQueues
from mailyard.org import Organization
from mailyard.redisconn import number, text_map
from mailyard.registry import now_ms

log = logging.getLogger("mailyard.hub.pressure")

EXPIRY_MS = 10_000


class Level(IntEnum):
    NORMAL = 0
    MEDIUM = 1
    HIGH = 2


def next_level(current: Level, value: float, normal: float, medium: float, high: float) -> Level:
    """The resource's level after reading ``value``, given where it was (hysteresis)."""
    if value >= high:
        return Level.HIGH
    if current is Level.HIGH:
        return Level.HIGH if value >= medium else (Level.MEDIUM if value >= normal else Level.NORMAL)
    if value >= medium:
        return Level.MEDIUM
    if current is Level.MEDIUM and value >= normal:
        return Level.MEDIUM
    return Level.NORMAL


@dataclass
class Reading:
    resource: str
    value: float
    level: Level
    thresholds: tuple[float, float, float]

    def describe(self) -> str:
        n, m, h = self.thresholds
        return f"{self.resource} = {self.value:g} [{self.level.name.title()}] [Normal={n:g} Medium={m:g} High={h:g}]"


def _thresholds(org: Organization) -> dict[str, tuple[float, float, float]]:
    t = org.transport
    return {
        "Memory": (t.pressure_memory_normal, t.pressure_memory_medium, t.pressure_memory_high),
        "SubmissionQueue": (t.pressure_submission_normal, t.pressure_submission_medium,
                            t.pressure_submission_high),
        "Backlog": (t.pressure_backlog_normal, t.pressure_backlog_medium, t.pressure_backlog_high),
    }


def measure(r: redis.Redis, org: Organization) -> dict[str, dict[str, float]]:
    """Current values per site: memory % of maxmemory (0 without one), Submission queue
    length, and ready-but-untaken items of the site's delivery queues."""
    memory = r.info("memory")
    limit = int(memory.get("maxmemory", 0) or 0)
    used_pct = 100.0 * int(memory.get("used_memory", 0)) / limit if limit else 0.0
    queues = RedisQueues.reader(r).queues()
    out = {}
    for site in org.sites:
        here = [q for q in queues if q.site == site.name]
        submission = sum(q.message_count for q in here if q.kind is QueueKind.SUBMISSION)
        backlog = sum(q.ready for q in here if q.kind is QueueKind.DELIVERY)
        out[site.name] = {"Memory": round(used_pct, 1), "SubmissionQueue": submission, "Backlog": backlog}
    return out


def update(r: redis.Redis, org: Organization) -> dict[str, Level]:
    """Recompute every site's level from the previous one and store it (for EXPIRY_MS)."""
    thresholds = _thresholds(org)
    levels = {}
    for site, values in measure(r, org).items():
        previous = text_map(r.hgetall(keys.pressure(site)))
        before = json.loads(previous.get("resources") or "{}")
        readings = [
            Reading(name, value, next_level(Level(before.get(name, 0)), value, *thresholds[name]), thresholds[name])
            for name, value in values.items()
        ]
        level = max((rd.level for rd in readings), default=Level.NORMAL)
        old = Level(number(previous.get("level")))
        if level != old:
            under = "; ".join(rd.describe() for rd in readings if rd.level > Level.NORMAL) or "none"
            log.warning("site %s: resource pressure changed from %s to %s. Under pressure: %s",
                        site, old.name.title(), level.name.title(), under)
        pipe = r.pipeline(transaction=True)
        pipe.hset(keys.pressure(site), mapping={
            "level": int(level),
            "resources": json.dumps({rd.resource: int(rd.level) for rd in readings}),
            "readings": json.dumps([rd.describe() for rd in readings]),
            "updated": now_ms(),
        })
        pipe.pexpire(keys.pressure(site), EXPIRY_MS)
        pipe.execute()
        levels[site] = level
    return levels


def site_level(r: redis.Redis, site: str) -> Level:
    return Level(number(r.hget(keys.pressure(site), "level"), default=Level.NORMAL))
