"""The organization's side of Edge subscriptions: import, list, sync now, remove
(Exchange's New-EdgeSubscription -FileData, Get-EdgeSubscription, Start-EdgeSynchronization,
Remove-EdgeSubscription). The subscriptions and the connectors they made are part of the
stored organization (mailyard.orgstore keeps them across ``org apply``); the bootstrap secret
is kept apart, until the first EdgeSync uses it or it expires (``my:edge:bootstrap:<edge>``).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from mailyard import keys, pki
from mailyard.edgesync import MAX_EDGE_NAME, SubscriptionFile, inbound_connector_name, internet_connector_name
from mailyard.errors import SiteError
from mailyard.org import AddressSpace, EdgeSubscription, Organization, SendConnector
from mailyard.orgstore import apply_org, read_org
from mailyard.redisconn import text_map


def import_subscription(r: redis.Redis, sub: SubscriptionFile, site: str, ca_dir: Path, *,
                        now: float | None = None) -> tuple[Organization, EdgeSubscription]:
    """Subscribe the Edge of ``sub`` to ``site``: refused if its secret expired, if the site is
    unknown or the Edge is subscribed already. Creates ``EdgeSync - <Site> to Internet`` (``*``,
    cost 100, DNS routing, from the Edge) unless the site has one, to which the Edge is added
    as another source (Exchange adds a second Edge of the site to the same connector)."""
    now = time.time() if now is None else now
    if sub.expired(now):
        ago = (now - sub.expires) / 60
        raise SiteError(f"the bootstrap secret of {sub.edge}'s subscription file expired {ago:.0f} min ago: "
                        "run `mailyard edge subscribe` on the Edge again and import the new file")
    _, org = read_org(r)
    if site not in {s.name for s in org.sites}:
        raise SiteError(f"the organization has no site {site!r} (sites: {', '.join(s.name for s in org.sites)})")
    if any(e.name == sub.edge for e in org.edge_subscriptions):
        raise SiteError(f"Edge {sub.edge} is subscribed already: `mailyard org edge remove {sub.edge}` first")
    if not pki.dns_label(sub.edge):
        raise SiteError(f"{sub.edge!r} cannot name an Edge's certificate")
    if any(pki.dns_label(e.name) == pki.dns_label(sub.edge) for e in org.edge_subscriptions):
        raise SiteError(f"an Edge subscribed already has the certificate name of {sub.edge!r} "
                        f"({pki.Identity.edge(sub.edge).dns_name}): rename one")
    if len(sub.edge) > MAX_EDGE_NAME:
        raise SiteError(f"an Edge's name has at most {MAX_EDGE_NAME} characters (its receive connector is named "
                        "after it)")
    if len(internet_connector_name(site)) > 64 or len(inbound_connector_name(site)) > 64:
        raise SiteError(f"site {site!r} has too long a name for its EdgeSync connectors (at most 64 characters)")
    issued = pki.CA(ca_dir).issue_for_key(pki.Identity.edge(sub.edge), pki.public_key_of(sub.certificate))
    edge = EdgeSubscription(name=sub.edge, site=site, fqdn=sub.fqdn, smtp=sub.smtp, sync=sub.sync,
                            certificate=sub.certificate, issued=issued.decode(), recipient_salt=sub.recipient_salt,
                            created=now)
    name = internet_connector_name(site)
    connectors = list(org.send_connectors)
    found = next((i for i, c in enumerate(connectors) if c.name == name), None)
    if found is None:
        connectors.append(SendConnector(name=name, address_spaces=[AddressSpace(space="*", cost=100)], dns_routing=True,
                                        source_sites=[site], source_edges=[sub.edge]))
    else:
        c = connectors[found]
        connectors[found] = c.model_copy(update={"source_edges": [*c.source_edges, sub.edge]})
    updated = org.model_copy(update={"edge_subscriptions": [*org.edge_subscriptions, edge],
                                     "send_connectors": connectors})
    r.set(keys.edge_bootstrap(sub.edge), sub.bootstrap_secret, pxat=int(sub.expires * 1000))
    r.delete(keys.edge_sync(sub.edge))
    apply_org(r, updated, keep_edges=False)
    return updated, edge


def remove_subscription(r: redis.Redis, name: str) -> Organization:
    """Remove-EdgeSubscription: the Edge no longer gets EdgeSync, its certificate no longer
    logs on to the hubs, and the connectors lose it as a source (a connector left with no
    source goes)."""
    _, org = read_org(r)
    if not any(e.name == name for e in org.edge_subscriptions):
        raise SiteError(f"no Edge {name!r} is subscribed (`mailyard org edge list`)")
    connectors = []
    for c in org.send_connectors:
        if name in c.source_edges:
            c = c.model_copy(update={"source_edges": [e for e in c.source_edges if e != name]})
            if not c.source_edges:
                continue
        connectors.append(c)
    updated = org.model_copy(update={"edge_subscriptions": [e for e in org.edge_subscriptions if e.name != name],
                                     "send_connectors": connectors})
    r.delete(keys.edge_bootstrap(name), keys.edge_sync(name), keys.edge_sync_now(name))
    apply_org(r, updated, keep_edges=False)
    return updated


@dataclass
class SyncState:
    edge: EdgeSubscription
    bootstrapped: bool
    config_at: float
    recipients_at: float
    recipients: int
    by: str
    error: str
    secret_expires_in: float | None  # seconds; None once used or expired

    def as_dict(self) -> dict[str, object]:
        return {"name": self.edge.name, "site": self.edge.site, "smtp": self.edge.smtp, "sync": self.edge.sync,
                "fingerprint": pki.fingerprint(self.edge.certificate), "bootstrapped": self.bootstrapped,
                "config_at": self.config_at or None, "recipients_at": self.recipients_at or None,
                "recipients": self.recipients, "by": self.by or None, "error": self.error or None,
                "secret_expires_in": self.secret_expires_in}


def sync_states(r: redis.Redis) -> list[SyncState]:
    _, org = read_org(r)
    out = []
    for edge in org.edge_subscriptions:
        raw = text_map(r.hgetall(keys.edge_sync(edge.name)))
        ttl = r.pttl(keys.edge_bootstrap(edge.name))
        out.append(SyncState(edge, raw.get("bootstrapped") == "1", float(raw.get("config_at") or 0),
                             float(raw.get("recipients_at") or 0), int(raw.get("recipients") or 0), raw.get("by", ""),
                             raw.get("error", ""), ttl / 1000 if ttl and ttl > 0 else None))
    return out


def request_sync(r: redis.Redis, names: list[str] | None = None) -> list[str]:
    """Start-EdgeSynchronization: the hub that pushes to each Edge does so within a second."""
    _, org = read_org(r)
    known = [e.name for e in org.edge_subscriptions]
    for name in names or []:
        if name not in known:
            raise SiteError(f"no Edge {name!r} is subscribed (subscribed: {', '.join(known) or 'none'})")
    chosen = names or known
    for name in chosen:
        r.set(keys.edge_sync_now(name), secrets.token_hex(8), ex=3600)  # (each request its own: see hub.edgesync)
    return chosen


def sync_pending(r: redis.Redis, name: str) -> bool:
    return bool(r.exists(keys.edge_sync_now(name)))
