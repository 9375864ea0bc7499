"""Edge Subscription and EdgeSync: what crosses between the organization and an Edge.

An Edge Transport server (``mailyard edge``) is not part of a site and never reaches the
organization's Redis. It is joined to a site as Exchange 2010 does it:

1. ``mailyard edge subscribe`` on the Edge makes its key, a self-signed certificate (Exchange's
   Edge-Cert) and a one-time bootstrap secret that expires (24 h by default), and writes the
   subscription file (``SubscriptionFile``; mode 0600: the secret is in it, as Exchange's ESBRA
   password is).
2. ``mailyard org edge import FILE --site S`` refuses a file whose secret expired, has the
   organization's CA issue a certificate for the Edge's key (``<edge>.edge.mailyard.internal``;
   the key never leaves the Edge), stores the subscription in the organization and creates the
   send connector ``EdgeSync - <Site> to Internet``.
3. A hub of the site pushes, one way, over HTTPS to the Edge's EdgeSync listener. It pins the
   Edge's self-signed certificate (from the file). The first push (``Bootstrap``) carries the
   secret, the organization's CA certificate and the Edge's issued certificate; from then on
   every push presents the site's hub certificate and the Edge takes nothing else (mutual TLS).
   ``ConfigPush`` every ``edge_sync_config_interval`` (3 min, Exchange's
   ConfigurationSyncInterval), ``RecipientsPush`` every ``edge_sync_recipient_interval`` (5 min),
   and both at once after ``mailyard org edge sync``.

Recipients cross as salted SHA-256 hashes (Exchange's EdgeSync stores one-way SHA-256 hashes
of proxy addresses; the salt, one per Edge, is in the subscription file): the Edge can tell
whether an address takes mail, never list them. Groups that take mail only from
authenticated senders are not sent (Exchange does not replicate recipients that refuse
external mail).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mailyard.addresses import canonical
from mailyard.directory import Directory
from mailyard.errors import SiteError
from mailyard.org import (
    AddressRewrite,
    AddressSpace,
    AntispamSettings,
    DkimKey,
    Organization,
    SendConnector,
    TransportSettings,
)

FORMAT = "mailyard-edge-subscription/1"
DEFAULT_VALIDITY = 24 * 3600.0  # New-EdgeSubscription -AccountExpiryDuration: 24 h
MIN_VALIDITY = 120.0  # its minimum: 2 minutes
MAX_EDGE_NAME = 29  # "Default internal receive connector <name>" fits a name's 64 characters

# The listener's paths (HTTPS, JSON bodies)
BOOTSTRAP_PATH = "/edgesync/bootstrap"
CONFIG_PATH = "/edgesync/config"
RECIPIENTS_PATH = "/edgesync/recipients"
STATUS_PATH = "/edgesync/status"


def inbound_connector_name(site: str) -> str:
    return f"EdgeSync - Inbound to {site}"


def internet_connector_name(site: str) -> str:
    return f"EdgeSync - {site} to Internet"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SubscriptionFile(_Wire):
    """What ``mailyard edge subscribe`` writes (Exchange: EdgeServerName, EdgeServerFQDN,
    EdgeCertificateBlob, ESRAPassword, EffectiveDate, Duration)."""

    format: str = FORMAT
    edge: str
    fqdn: str
    smtp: str  # HOST:PORT of its receive connector
    sync: str  # HOST:PORT of its EdgeSync listener
    certificate: str  # self-signed, PEM
    bootstrap_secret: str
    recipient_salt: str
    effective: float  # seconds since the epoch
    duration: float  # seconds the bootstrap secret is valid

    @property
    def expires(self) -> float:
        return self.effective + self.duration

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires


def read_subscription(path: Path) -> SubscriptionFile:
    """A subscription file, or SiteError saying what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SiteError(f"cannot read the subscription file {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SiteError(f"{path} is not an Edge subscription file (not JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SiteError(f"{path} is not an Edge subscription file (no \"format\": \"{FORMAT}\")")
    try:
        return SubscriptionFile.model_validate(data)
    except ValidationError as exc:
        wrong = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise SiteError(f"{path} is not a valid Edge subscription file: {wrong}") from None


class Bootstrap(_Wire):
    """The first push: proves the hub holds the file's secret, and gives the Edge what it
    needs for mutual TLS with the site's hubs."""

    secret: str
    organization: str
    site: str
    ca: str  # the organization's CA certificate, PEM
    issued: str  # the Edge's certificate from that CA, PEM


class ConfigPush(_Wire):
    """Configuration: accepted domains, the send connectors the Edge uses, the site's hubs
    (its next hop for the organization's mail), the anti-spam settings, the address rewrite
    entries and the transport settings."""

    organization: str
    site: str
    accepted_domains: list[str] = Field(min_length=1)
    send_connectors: list[SendConnector]
    hubs: list[str]  # HOST:PORT of the site's hubs' receive connector for Exchange servers
    antispam: AntispamSettings
    transport: TransportSettings
    dkim: list[DkimKey] = Field(default_factory=list)  # over mutually authenticated TLS only
    address_rewrites: list[AddressRewrite] = Field(default_factory=list)
    org_version: int = 0  # the organization's version it was made of: an Edge takes no older one
    generated_at: float


class RecipientsPush(_Wire):
    hashes: list[str]  # every address that takes mail from anyone
    closed: list[str] = Field(default_factory=list)  # groups that take mail only from authenticated senders
    generated_at: float


def recipient_hash(salt: str, address: str) -> str:
    """How an address crosses to an Edge: salted SHA-256, hex, of its canonical form."""
    return hashlib.sha256(f"{salt}\0{canonical(address)}".encode()).hexdigest()


def external_recipients(org: Organization) -> set[str]:
    """Every address of the organization that takes mail from outside: mailboxes and their
    aliases, mail contacts' own addresses, groups that take mail from anyone (and nest no
    group that does not: an open group must not be a way into a closed one)."""
    directory = Directory(org)
    out: set[str] = set()
    for mb in org.mailboxes:
        out.add(mb.address)
        out.update(mb.aliases)
    out.update(g.address for g in org.groups if not directory.requires_sender_authentication(g.address))
    out.update(c.address for c in org.contacts if c.address)
    return out


def closed_groups(org: Organization) -> set[str]:
    """The groups that take mail only from authenticated senders (here, or through a group
    nested in them): the Edge refuses them to anonymous senders as a hub does."""
    directory = Directory(org)
    return {g.address for g in org.groups if directory.requires_sender_authentication(g.address)}


def recipients_push(org: Organization, salt: str, now: float | None = None) -> RecipientsPush:
    return RecipientsPush(hashes=sorted(recipient_hash(salt, a) for a in external_recipients(org)),
                          closed=sorted(recipient_hash(salt, a) for a in closed_groups(org)),
                          generated_at=time.time() if now is None else now)


def config_push(org: Organization, site: str, edge: str, hubs: list[str], now: float | None = None,
                dkim: list[DkimKey] | None = None, org_version: int = 0) -> ConfigPush:
    """The configuration an Edge subscribed to ``site`` gets: the organization's accepted
    domains, ``EdgeSync - Inbound to <site>`` (every accepted domain, to the site's hubs,
    ``--``) and every send connector this Edge is a source of, as the Edge runs them (its own:
    no source sites or Edges)."""
    inbound = SendConnector(name=inbound_connector_name(site),
                            address_spaces=[AddressSpace(space=d) for d in org.accepted_domains], dns_routing=False,
                            smart_hosts=["--"], max_message_size=org.transport.max_message_size)
    own = [c.model_copy(update={"source_sites": [], "source_servers": [], "source_edges": []})
           for c in org.send_connectors if edge in c.source_edges]
    return ConfigPush(organization=org.name, site=site, accepted_domains=list(org.accepted_domains),
                      send_connectors=[inbound, *own], hubs=hubs, antispam=org.antispam, transport=org.transport,
                      dkim=[k for k in dkim or [] if k.active],  # (a pending key signs nothing)
                      address_rewrites=list(org.address_rewrites), org_version=org_version,
                      generated_at=time.time() if now is None else now)
