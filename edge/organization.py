"""The Edge's own copy of the organization, made from what EdgeSync pushed.

It is an ``Organization`` so that the hub's pipeline runs on the Edge unchanged (its queues,
retries, DSNs, tracking, the Queue Viewer), with an ``edge`` section that tells the stages
where they are: one site named after the Edge, no mailboxes (the Edge knows recipients only as
hashes, ``my:edge:recipients``), the accepted domains, the send connectors EdgeSync gave it
(``EdgeSync - Inbound to <Site>`` to the site's hubs, and every connector it is a source of),
and one receive connector, Exchange's ``Default internal receive connector <Edge>`` with the
Edge's defaults.
"""

from __future__ import annotations

from mailyard.edgesync import ConfigPush
from mailyard.org import EdgeRole, Organization, ReceiveConnector, Site, TransportSettings

# Set-TransportServer's defaults that differ on an Edge (reference §1): taken where the
# organization's transport settings are still the hub's defaults, never over a value set.
EDGE_DEFAULTS = {"transient_failure_retry_interval": (300, 600),
                 "outbound_connection_failure_retry_interval": (600, 1800)}


def edge_transport(transport: TransportSettings) -> TransportSettings:
    changes = {name: edge for name, (hub, edge) in EDGE_DEFAULTS.items() if getattr(transport, name) == hub}
    return transport.model_copy(update=changes)


def receive_connector_name(edge: str) -> str:
    return f"Default internal receive connector {edge}"


def edge_organization(push: ConfigPush, *, name: str, fqdn: str, smtp: str, salt: str,
                      rspamd: str = "", dns_servers: list[str] | None = None) -> Organization:
    """The organization an Edge named ``name`` runs, listening for SMTP on ``smtp``; its DNS
    the organization's unless it has servers of its own (a perimeter network's)."""
    receive = ReceiveConnector(
        name=receive_connector_name(name),
        bindings=[smtp],
        # Anyone from the Internet; the site's hubs by their certificate (ExchangeServers);
        # partners (TLS with a certificate of theirs: not yet told apart).
        permission_groups=["AnonymousUsers", "ExchangeServers", "Partners"],
        auth_mechanisms=["Tls", "ExchangeServer"],
        max_message_size=push.transport.max_message_size,
        # Exchange 2010's Edge defaults: a 5 min session, 1 min of silence
        connection_timeout=5 * 60,
        connection_inactivity_timeout=60,
        fqdn=fqdn,
    )
    return Organization(
        name=push.organization,
        accepted_domains=push.accepted_domains,
        transport=edge_transport(push.transport.model_copy(update={"dns_servers": dns_servers})
                                 if dns_servers else push.transport),
        sites=[Site(name=name)],
        send_connectors=push.send_connectors,
        receive_connectors=[receive],
        antispam=push.antispam,
        address_rewrites=push.address_rewrites,
        edge=EdgeRole(name=name, site=push.site, hubs=push.hubs, recipient_salt=salt, dkim=push.dkim,
                      rspamd=rspamd),
    )
