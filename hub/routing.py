"""Routing: the next hop of each resolved recipient, and the queue that leads there.

- a mailbox of this site: its mailbox server's MapiDelivery queue;
- a mailbox of another site: that site's SmtpRelayToRemoteAdSite queue;
- anything outside the organization (a contact's external address, an external domain):
  the send connector chosen by Exchange's least-cost rules, through its
  DnsConnectorDelivery (one queue per domain) or SmartHostConnectorDelivery queue; when its
  source servers are in another site, the message is relayed to that site first; when they
  are Edge subscriptions (``EdgeSync - <Site> to Internet``), the hubs of its site relay to
  those Edges (one SmartHostConnectorDelivery queue) and the Edge delivers;
- on an Edge, whose copy of the organization has no mailboxes: an address of an accepted
  domain goes by ``EdgeSync - Inbound to <Site>`` to the site's hubs;
- no connector at all: the Unreachable queue.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailyard.broker import site_queue
from mailyard.directory import Final, Kind
from mailyard.hub.queues import (
    QueueSpec,
    mapi_queue,
    remote_site_queue,
    unreachable_queue,
)
from mailyard.hub.records import DeliveryType, QueueKind
from mailyard.org import AddressSpace, Organization, SendConnector


def connector_celery_queue(connector: SendConnector, site: str) -> str:
    """Celery queue of a connector's delivery queues: the connector's own when it names
    source servers (only they consume it), else the site's."""
    return f"connector.{connector.name}" if connector.source_servers else site_queue(site)


def space_specificity(space: AddressSpace, domain: str) -> int:
    """How specifically ``space`` matches ``domain``: -1 no match, higher is more specific."""
    pattern = space.space
    if pattern == "*":
        return 0
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return len(suffix) if domain.endswith(suffix) or domain == pattern[2:] else -1
    return 1000 + len(pattern) if domain == pattern else -1


def site_cost(org: Organization, source: str, target: str) -> tuple[int, int] | None:
    """Least (cost, hops) from ``source`` to ``target`` over the site links; None if none."""
    if source == target:
        return 0, 0
    best: dict[str, tuple[int, int]] = {source: (0, 0)}
    frontier = [source]
    while frontier:
        here = frontier.pop()
        cost, hops = best[here]
        for link in org.site_links:
            if here not in link.sites:
                continue
            for other in link.sites:
                candidate = (cost + link.cost, hops + 1)
                if other != here and (other not in best or candidate < best[other]):
                    best[other] = candidate
                    frontier.append(other)
    if target in best:
        return best[target]
    # Sites with no link between them still reach each other (one flat hop), as a fresh
    # Exchange organization's default IP site link does.
    return (10, 1) if not org.site_links else None


@dataclass(frozen=True)
class Choice:
    connector: SendConnector
    source_site: str  # the site whose hubs deliver through it


def least_cost_connector(org: Organization, domain: str, size: int, local_site: str) -> Choice | None:
    """Exchange's least-cost connector selection (reference §4.2)."""
    ranked = []
    for conn in org.send_connectors:
        if not conn.enabled or conn.max_message_size < size:
            continue
        specificity, space_cost = -1, 0
        for space in conn.address_spaces:
            if space.type.upper() != "SMTP":
                continue
            s = space_specificity(space, domain)
            if s > specificity or (s == specificity and space.cost < space_cost):
                specificity, space_cost = s, space.cost
        if specificity < 0:
            continue
        sites = conn.source_sites or [s.name for s in org.sites]
        for source in sites:
            path = site_cost(org, local_site, source)
            if path is None:
                continue
            cost, hops = path
            ranked.append((-specificity, space_cost + cost, hops, conn.name, source, conn))
    if not ranked:
        return None
    ranked.sort(key=lambda t: t[:5])
    best = ranked[0]
    return Choice(best[5], best[4])


def next_hop_queue(org: Organization, local_site: str, rcpt: Final, size: int) -> QueueSpec:
    """The queue that leads to the next hop of ``rcpt`` (a resolved recipient): see above."""
    if rcpt.kind is Kind.MAILBOX and rcpt.site and rcpt.server:
        if rcpt.site == local_site:
            return mapi_queue(local_site, rcpt.server)
        return remote_site_queue(local_site, rcpt.site)
    domain = rcpt.address.rpartition("@")[2]
    choice = least_cost_connector(org, domain, size, local_site)
    if choice is None:
        return unreachable_queue(local_site)
    if choice.source_site != local_site:
        return remote_site_queue(local_site, choice.source_site)
    conn = choice.connector
    celery_queue = connector_celery_queue(conn, local_site)
    if conn.source_edges and org.edge is None:
        return QueueSpec(f"{local_site}\\{conn.name}", local_site, QueueKind.DELIVERY, DeliveryType.SMART_HOST,
                         ",".join(conn.source_edges), celery_queue, conn.name)
    if conn.dns_routing:
        return QueueSpec(f"{local_site}\\{domain}", local_site, QueueKind.DELIVERY, DeliveryType.DNS, domain,
                         celery_queue, conn.name)
    return QueueSpec(f"{local_site}\\{conn.name}", local_site, QueueKind.DELIVERY, DeliveryType.SMART_HOST,
                     ",".join(conn.smart_hosts), celery_queue, conn.name)
