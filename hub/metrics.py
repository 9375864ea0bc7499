"""Prometheus metrics for the whole site, read from Redis at scrape time.

One custom collector (no state in the process: any number of viewers can serve it, and a
restart loses nothing) that turns the queues and the counters of ``my:stats`` into:

  mailyard_queue_messages{queue,site,delivery_type,status}    gauge: messages in the queue
  mailyard_queue_oldest_message_age_seconds{queue}             gauge: age of its oldest message
  mailyard_recipients_total{event,queue}                       DELIVER, SEND, DEFER and FAIL per
                                                               next hop queue (recipients)
  mailyard_messages_received_total{source}                     RECEIVE (messages), per source
  mailyard_ndrs_total                                          DSNs generated (messages)
  mailyard_smtp_sessions_total{hub,connector}                  SMTP sessions accepted
  mailyard_hubs_alive{site}                                    hubs with a recent heartbeat
  mailyard_back_pressure{site}                                 0 Normal, 1 Medium, 2 High
  mailyard_back_pressure_resource{site,resource}               each resource's level

deploy/prometheus/alerts.yml alerts on them (queue age, no hub alive, High, deferrals).

A scrape costs four Redis round trips (pipelined) whatever the number of queues and hubs,
plus one to check the organization's version.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mailyard import keys
from mailyard.errors import MailyardError
from mailyard.hub.redis_queues import RedisQueues
from mailyard.orgstore import OrgCache
from mailyard.redisconn import number, scored, text, text_map, texts

RECIPIENT_EVENTS = ("DELIVER", "SEND", "DEFER", "FAIL")
DEFAULT_HEARTBEAT_TIMEOUT_S = 5.0

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SiteCollector(Collector):
    """Collects the site's metrics from Redis on every scrape."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.orgs = OrgCache(r, max_age=5.0)

    def _org_view(self) -> tuple[float, list[str]]:
        """The hub heartbeat timeout and the site names (defaults when no org is applied)."""
        try:
            org = self.orgs.org
        except MailyardError:
            return DEFAULT_HEARTBEAT_TIMEOUT_S, []
        return float(org.transport.hub_heartbeat_timeout), [s.name for s in org.sites]

    def collect(self) -> Iterator[Metric]:
        r = self.r
        pipe = r.pipeline(transaction=False)
        pipe.zrange(keys.QUEUES, 0, -1)
        pipe.hgetall(keys.STATS)
        pipe.zrange(keys.HUBS, 0, -1, withscores=True)
        names_raw, stats_raw, beats = pipe.execute()
        names = texts(names_raw)
        beats = scored(beats)
        hub_names = [name for name, _ in beats]

        queues = RedisQueues.reader(r).queues(names) if names else []
        pipe = r.pipeline(transaction=False)
        for q in queues:
            pipe.zrange(keys.queue_members(q.identity), 0, 0, withscores=True)
        for name in hub_names:
            pipe.hget(keys.hub(name), "site")
        replies = pipe.execute() if queues or hub_names else []
        oldest, hub_sites = replies[: len(queues)], replies[len(queues):]
        now_ms = time.time() * 1000

        depth = GaugeMetricFamily("mailyard_queue_messages", "Messages in the queue (Get-Queue MessageCount).",
                                  labels=["queue", "site", "delivery_type", "status"])
        age = GaugeMetricFamily("mailyard_queue_oldest_message_age_seconds",
                                "Seconds since the oldest message in the queue entered it (0 when empty).",
                                labels=["queue"])
        for q, first in zip(queues, oldest, strict=True):
            depth.add_metric([q.identity, q.site, q.delivery_type, q.status.value], q.message_count)
            age.add_metric([q.identity], max(0.0, (now_ms - first[0][1]) / 1000) if first else 0.0)
        yield depth
        yield age

        recipients = CounterMetricFamily("mailyard_recipients", "Recipients delivered (DELIVER, SEND), "
                                         "deferred (DEFER) and failed (FAIL), per next hop queue.",
                                         labels=["event", "queue"])
        received = CounterMetricFamily("mailyard_messages_received", "Messages received (RECEIVE), per source.",
                                       labels=["source"])
        sessions = CounterMetricFamily("mailyard_smtp_sessions", "SMTP sessions accepted by receive connectors.",
                                       labels=["hub", "connector"])
        ndrs = 0
        for field, value in sorted(text_map(stats_raw).items()):
            event, _, label = field.partition("|")
            count = number(value)
            if event in RECIPIENT_EVENTS:
                recipients.add_metric([event, label], count)
            elif event == "RECEIVE":
                received.add_metric([label], count)
            elif event == "DSN":
                ndrs += count
            elif event == "SESSION":
                hub, _, connector = label.partition("\\")
                sessions.add_metric([hub, connector], count)
        yield recipients
        yield received
        yield CounterMetricFamily("mailyard_ndrs", "Delivery status notifications generated (NDRs and delay DSNs).",
                                  value=ndrs)
        yield sessions

        timeout_s, sites = self._org_view()
        alive = dict.fromkeys(sites, 0)
        for (_, beat), site in zip(beats, hub_sites, strict=True):
            name = text(site)
            alive.setdefault(name, 0)
            if now_ms - beat <= timeout_s * 1000:
                alive[name] += 1
        hubs = GaugeMetricFamily("mailyard_hubs_alive", "Hubs whose heartbeat is recent, per site.", labels=["site"])
        for site_name, count in sorted(alive.items()):
            hubs.add_metric([site_name], count)
        yield hubs
        yield from self._pressure(sorted(alive))

    def _pressure(self, sites: list[str]) -> Iterator[Metric]:
        """Each site's back pressure (the sweeper's, gone with it after 10 s: Normal then)."""
        pipe = self.r.pipeline(transaction=False)
        for site in sites:
            pipe.hgetall(keys.pressure(site))
        level = GaugeMetricFamily("mailyard_back_pressure", "The site's back pressure level: 0 Normal, 1 Medium, "
                                  "2 High (new mail refused).", labels=["site"])
        resource = GaugeMetricFamily("mailyard_back_pressure_resource", "Each watched resource's level "
                                     "(Memory, SubmissionQueue, Backlog), per site.", labels=["site", "resource"])
        for site, raw in zip(sites, pipe.execute() if sites else [], strict=True):
            data = text_map(raw)
            level.add_metric([site], number(data.get("level")))
            try:
                levels = json.loads(data.get("resources") or "{}")
            except ValueError:
                levels = {}
            for name in ("Memory", "SubmissionQueue", "Backlog"):
                resource.add_metric([site, name], float(levels.get(name, 0)))
        yield level
        yield resource


def make_registry(r: redis.Redis) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SiteCollector(r))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The exposition text (Prometheus text format 0.0.4)."""
    return generate_latest(registry)
