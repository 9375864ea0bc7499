"""When a process of the local site is ready: when what it serves answers, as a user would
reach it, not when it has merely started.

- a mailbox server: registered in Redis under its own pid, and its API answers ``/health``
  over TLS with its certificate of the organization's CA;
- a hub: registered under its own pid with a recent heartbeat, every enabled receive
  connector of its site greets (an SMTP ``220``) where the site planned it, and Flower (when
  the site runs one) lists it as online;
- Flower: ``/healthcheck`` answers and its API lists every hub of the site as online;
- the Queue Viewer: ``/health`` answers;
- the demo Internet: its DNS server answers an MX query and each of its MX hosts greets.

Each check returns None when ready, else why not (for the log and the error at the deadline).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import httpx
import redis

from mailyard import keys, pki, redisconn, registry
from mailyard.cli.health import smtp_greeting
from mailyard.org import Organization
from mailyard.redisconn import number

TIMEOUT_S = 2.0


@dataclass
class Probes:
    r: redis.Redis
    org: Organization  # as applied to the site's Redis
    pki_dir: Path
    hubs: list[str] = field(default_factory=list)  # every hub of the site, by name
    flower_url: str | None = None
    flower_auth: tuple[str, str] | None = None
    edge_redis_url: str | None = None  # the demo Edge's own Redis (with its password)
    timeout: float = TIMEOUT_S

    def check(self, role: str, name: str, pid: int, endpoints: dict[str, Any]) -> str | None:
        try:
            if role == "mailbox":
                return self.mailbox(name, pid, endpoints["url"])
            if role == "hub":
                return self.hub(name, pid, endpoints.get("site", ""), endpoints.get("smtp", {}))
            if role == "flower":
                return self.flower()
            if role == "viewer":
                return self.http(endpoints["url"].rstrip("/") + "/health")
            if role == "internet":
                return self.internet(endpoints)
            if role == "redis":
                return None if self.r.ping() else "no PONG"
            if role == "edge-redis":
                assert self.edge_redis_url is not None
                return None if redisconn.connect(self.edge_redis_url).ping() else "no PONG"
            if role == "edge":
                return self.edge(endpoints)
        except (OSError, ValueError, httpx.HTTPError, redis.RedisError, dns.exception.DNSException) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def mailbox(self, server: str, pid: int, url: str) -> str | None:
        if number(self.r.hget(keys.server(server), "pid")) != pid:
            return "not registered in Redis yet"
        identity = pki.Identity.mailbox(server)
        with httpx.Client(verify=pki.trust_context(self.pki_dir / pki.CA_CERT), timeout=self.timeout) as client:
            response = client.get(url.rstrip("/") + "/health", headers={"Host": identity.dns_name},
                                  extensions=pki.sni(identity))
        return None if response.status_code == 200 else f"/health answered {response.status_code}"

    def hub(self, name: str, pid: int, site: str, planned: dict[str, str]) -> str | None:
        info = next((h for h in registry.hubs(self.r) if h.name == name), None)
        if info is None or number(self.r.hget(keys.hub(name), "pid")) != pid:
            return "not registered in Redis yet"
        if not info.alive(self.org.transport.hub_heartbeat_timeout):
            return "no recent heartbeat"
        for connector in connectors_of(self.org, site):
            address = info.endpoints.get(connector)
            if address is None:
                return f"receive connector {connector} not listening yet"
            if connector in planned and address != planned[connector]:
                return f"receive connector {connector} listens on {address}, not on {planned[connector]}"
            smtp_greeting(address, self.timeout)
        if self.flower_url is not None:
            return None if self._flower_online().get(f"hub@{name}") else "not online in Flower yet"
        return None

    def flower(self) -> str | None:
        assert self.flower_url is not None
        problem = self.http(self.flower_url + "/healthcheck")
        if problem:
            return problem
        online = self._flower_online()
        missing = [h for h in self.hubs if not online.get(f"hub@{h}")]
        return f"does not list {', '.join(missing)} as online yet" if missing else None

    def _flower_online(self) -> dict[str, bool]:
        """Flower's view of the workers: node name -> online (from their events)."""
        assert self.flower_url is not None
        response = httpx.get(self.flower_url + "/api/workers", params={"status": "1"}, auth=self.flower_auth,
                             timeout=self.timeout)
        response.raise_for_status()
        return {str(k): bool(v) for k, v in response.json().items()}

    def http(self, url: str) -> str | None:
        response = httpx.get(url, timeout=self.timeout)
        return None if response.is_success else f"{url} answered {response.status_code}"

    def edge(self, endpoints: dict[str, Any]) -> str | None:
        """Ready once its transport takes mail: after the first EdgeSync, which the hubs push."""
        try:
            smtp_greeting(endpoints["edge_smtp"], self.timeout)
        except (OSError, ValueError):
            return "its receive connector does not answer yet (it starts after the first EdgeSync from a hub)"
        return None

    def internet(self, endpoints: dict[str, Any]) -> str | None:
        host, _, port = endpoints["dns"].rpartition(":")
        domain = endpoints["domains"][0]
        answer = dns.query.udp(dns.message.make_query(domain, "MX"), host, port=int(port), timeout=self.timeout)
        if not answer.answer:
            return f"the DNS server has no MX for {domain}"
        for address in endpoints["mx"]:
            smtp_greeting(address, self.timeout)
        return None


def connectors_of(org: Organization, site: str) -> list[str]:
    """The receive connectors a hub of ``site`` runs."""
    return sorted(c.name for c in org.receive_connectors if c.enabled and (not c.sites or site in c.sites))
