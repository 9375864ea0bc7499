"""The demo's Edge Transport server (``site up`` unless ``--no-edge``): one Edge, EDGE-01,
subscribed to the organization's first site, as the seed draws it. It has its own Redis (a
child of the site, its password in secrets.toml ``[edge]``, never the organization's) and its
own data directory (``<data dir>/edge-01``: its key, its certificates, its Redis).

What the site does for it, as an operator would by hand:

- on the first start (and whenever its addresses changed), ``mailyard edge subscribe`` and
  ``mailyard org edge import FILE --site <first site>`` (the file is deleted at once);
- the hubs keep only the organization's own connectors: the file's anonymous receive
  connectors and DNS-routed send connectors are left out (the Internet reaches the Edge, and
  the hubs reach the Internet through ``EdgeSync - <Site> to Internet``); the demo file has
  them turned off, and ``--no-edge`` turns them on (``with_internet_connectors``);
- the demo Internet's DNS publishes each accepted domain's MX at the Edge's own loopback
  address, the DKIM key of the first accepted domain (made once, ``org dkim new``), and a DNS
  block list (``bl.internet.example``) that lists 127.0.0.66, a known spammer the demo can
  send from (``mailyard internet send --source 127.0.0.66``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import redis

from mailyard import dkim_keys, pki
from mailyard.edge.home import EdgeHome
from mailyard.edge_subscriptions import import_subscription, remove_subscription
from mailyard.edgesync import SubscriptionFile, internet_connector_name
from mailyard.org import AddressSpace, BlockListProvider, DkimKey, Organization, SendConnector
from mailyard.orgstore import read_org

log = logging.getLogger("mailyard.site.edge")

NAME = "EDGE-01"
DIR_NAME = "edge-01"
ADDRESS = "127.0.0.10"  # the Edge's SMTP address: the MX host of the organization's domains
SYNC_PORT = 50636  # Exchange's EdgeSync port, when free
BLOCK_LIST = "bl.internet.example"
SPAMMER = "127.0.0.66"  # listed by the block list
LISTED = "127.0.0.2"  # RFC 5782: the answer that means "listed"


def edge_dir(data_dir: Path) -> Path:
    return data_dir / DIR_NAME


def site_of(org: Organization) -> str:
    return org.sites[0].name


def without_internet_connectors(org: Organization, internet_port: int | None) -> Organization:
    """The organization of a site with an Edge: no anonymous receive connector on the hubs, no
    DNS-routed send connector of their own; ``EdgeSync - <Site> to Internet`` (which the
    import makes, and which keeps its Edges across applies) on the demo Internet's port; the
    demo block list when there is a demo Internet."""
    site = site_of(org)
    receive = [c for c in org.receive_connectors if "AnonymousUsers" not in c.permission_groups]
    send = [c for c in org.send_connectors if c.source_edges or not c.dns_routing]
    name = internet_connector_name(site)
    if not any(c.name == name for c in send):
        send.append(SendConnector(name=name, address_spaces=[AddressSpace(space="*", cost=100)], dns_routing=True,
                                  source_sites=[site], port=internet_port or 25))
    antispam = org.antispam
    if internet_port is not None and not any(p.lookup_domain == BLOCK_LIST for p in antispam.block_list_providers):
        demo = BlockListProvider(name="Demo Internet block list", lookup_domain=BLOCK_LIST)
        antispam = antispam.model_copy(update={"block_list_providers": [*antispam.block_list_providers, demo]})
    dropped = sorted({c.name for c in org.receive_connectors} - {c.name for c in receive}
                     | {c.name for c in org.send_connectors} - {c.name for c in send})
    if dropped and internet_port is not None:
        log.info("the Edge takes the Internet's mail: the hubs run without %s", ", ".join(dropped))
    return org.model_copy(update={"receive_connectors": receive, "send_connectors": send, "antispam": antispam})


def with_internet_connectors(org: Organization) -> Organization:
    """The organization of a site without an Edge (``--no-edge``): the file's connectors for
    the Internet (anonymous receive connectors, DNS-routed send connectors) that it turned off
    because the Edge does their work, on."""
    receive = [c.model_copy(update={"enabled": True}) if "AnonymousUsers" in c.permission_groups else c
               for c in org.receive_connectors]
    send = [c.model_copy(update={"enabled": True}) if c.dns_routing and not c.source_edges else c
            for c in org.send_connectors]
    return org.model_copy(update={"receive_connectors": receive, "send_connectors": send})


def ensure_subscribed(r: redis.Redis, data_dir: Path, *, smtp: str, sync: str) -> bool:
    """Subscribe the demo Edge to the first site, unless it is subscribed at these addresses
    already (the organization lists it, and the Edge has its files and was bootstrapped). True
    if it subscribed now."""
    home = EdgeHome(edge_dir(data_dir))
    _, org = read_org(r)
    current = next((e for e in org.edge_subscriptions if e.name == NAME), None)
    # Kept only once bootstrapped: a subscription whose first EdgeSync never came (a site
    # stopped before it) is made anew, or its secret could expire before the next start.
    if (current is not None and current.smtp == smtp and current.sync == sync and home.exists()
            and home.subscribed() is not None and home.cert_path.exists()
            and pki.fingerprint(home.cert_path.read_text()) == pki.fingerprint(current.certificate)):
        return False
    if current is not None:
        log.info("the Edge's subscription changed or never completed: subscribing it again")
        remove_subscription(r, NAME)
    if home.exists():
        home.unsubscribe()
    fqdn = f"{NAME.lower()}.{org.accepted_domains[0]}"  # (its banner, HELO and Received lines: the MX host's name)
    sub: SubscriptionFile = home.subscribe(name=NAME, fqdn=fqdn, smtp=smtp, sync=sync)
    import_subscription(r, sub, site_of(org), pki.pki_dir(data_dir))
    log.info("subscribed %s to site %s (EdgeSync %s, SMTP %s)", NAME, site_of(org), sync, smtp)
    return True


def ensure_dkim_key(r: redis.Redis, org: Organization) -> DkimKey:
    """The first accepted domain's active DKIM key, made (and activated) the first time."""
    domain = org.accepted_domains[0]
    found = next((k for k in dkim_keys.signing_keys(r) if k.domain == domain), None)
    return found or dkim_keys.new_key(r, domain, activate=True)  # (the demo's DNS publishes it at once)


def dns_records(org: Organization, smtp_address: str, dkim: DkimKey | None) -> list[str]:
    """The demo Internet's records for the organization (``internet serve --record``)."""
    out = []
    for domain in org.accepted_domains:
        out += [f"{domain} MX 10 mx.{domain}", f"mx.{domain} A {smtp_address}"]
    if dkim is not None:
        out.append(f"{dkim_keys.txt_name(dkim)} TXT {dkim_keys.txt_value(dkim)}")
    reversed_ip = ".".join(reversed(SPAMMER.split(".")))
    out.append(f"{reversed_ip}.{BLOCK_LIST} A {LISTED}")
    out.append(f"{reversed_ip}.{BLOCK_LIST} TXT Listed by the demo Internet: a known spammer")
    return out
