"""The organization file: Mailyard's Active Directory, as one validated TOML document.

It names accepted domains, sites and their mailbox servers, mailboxes, distribution groups,
mail contacts, send and receive connectors and the transport settings (Exchange 2010
defaults, DESIGN §4). ``load_org`` validates it and reports every problem with its dotted
key and its line; ``mailyard.orgstore`` keeps the validated copy in Redis for every node.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
)

from mailyard import passwords, pki
from mailyard.addresses import canonical, normalize_address, normalize_domain
from mailyard.errors import ConfigError, ConfigProblem
from mailyard.units import format_duration, format_size, parse_duration, parse_size

Duration = Annotated[
    float, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)
]
Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size, return_type=str)]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")

TlsAuthLevel = Literal["EncryptionOnly", "CertificateValidation", "DomainValidation"]
PermissionGroup = Literal["AnonymousUsers", "ExchangeUsers", "ExchangeServers", "Partners"]
AuthMechanism = Literal["None", "Tls", "BasicAuth", "BasicAuthRequireTLS", "ExchangeServer", "ExternalAuthoritative"]
PERMISSION_GROUPS: tuple[str, ...] = get_args(PermissionGroup)
AUTH_MECHANISMS: tuple[str, ...] = get_args(AuthMechanism)
_DEFAULT_GROUPS: list[PermissionGroup] = ["ExchangeUsers", "ExchangeServers"]
_DEFAULT_MECHANISMS: list[AuthMechanism] = ["Tls", "BasicAuth", "BasicAuthRequireTLS"]


# An address or domain in the file may be written in any case and, for an internationalized
# one (RFC 6531), with its domain as U-labels or A-labels: each is stored in the one canonical
# form of mailyard.addresses (lower case, NFC, U-labels), so ``jürgen@bücher.example`` and
# ``Jürgen@xn--bcher-kva.example`` name the same mailbox.
Address = Annotated[str, BeforeValidator(normalize_address)]
Domain = Annotated[str, BeforeValidator(normalize_domain)]


def _check_name(value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use letters, digits, space, dot, dash or "
            "underscore, starting with a letter or digit, at most 64 characters"
        )
    return value


Name = Annotated[str, BeforeValidator(_check_name)]

# A mailbox's password: in clear (the demo) or hashed (`mailyard org hash-password`, scrypt$...).
# `mailyard org apply` stores only the hash (mailyard.orgstore); a malformed hash is refused here.
Password = Annotated[str, AfterValidator(passwords.check)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Durability = Literal["auto", "local", "replica"]  # transport.durability


class TransportSettings(_Model):
    """Set-TransportConfig / Set-TransportServer, with Exchange 2010's defaults."""

    message_expiration_timeout: Duration = 2 * 86400
    delay_notification_timeout: Duration = 4 * 3600
    delay_dsn_enabled: bool = True
    queue_glitch_retry_count: int = Field(4, ge=0, le=15)
    queue_glitch_retry_interval: Duration = 60
    transient_failure_retry_count: int = Field(6, ge=0, le=15)
    transient_failure_retry_interval: Duration = 300
    outbound_connection_failure_retry_interval: Duration = 600
    message_retry_interval: Duration = 60
    max_message_size: Size = 10 * 1024 * 1024
    max_recipient_envelope_limit: int = Field(5000, ge=1)
    max_per_domain_outbound_connections: int = Field(20, ge=1)
    max_concurrent_mailbox_deliveries: int = Field(20, ge=1, le=256)
    poison_message_detection_enabled: bool = True
    poison_threshold: int = Field(2, ge=1, le=10)
    queue_max_idle_time: Duration = 180
    message_tracking_log_max_age: Duration = 30 * 86400
    # Mailyard's own settings (no Exchange counterpart):
    submission_ack_timeout: Duration = 30  # re-notify another hub if a pickup is not acked
    hub_heartbeat_timeout: Duration = 5  # a hub silent this long leaves the round robin
    lease_time: Duration = 120  # how long a worker owns the items it took from a queue
    batch_size: int = Field(50, ge=1, le=1000)  # items a delivery task takes at once
    sweep_interval: Duration = 1
    # EdgeSync (Set-EdgeSyncServiceConfig): how often the hubs of a site push to its Edges
    edge_sync_config_interval: Duration = Field(180, gt=0)  # ConfigurationSyncInterval, 3 min
    edge_sync_recipient_interval: Duration = Field(300, gt=0)  # RecipientSyncInterval, 5 min
    # A message whose Message-ID is already in the mailbox's folder (its Inbox; for a client's
    # "Send", its Outbox or Sent Items) and was stored there less than this long ago is not
    # stored again, whatever hub or path brought it (the Exchange store's duplicate
    # detection; mailyard.mailbox.dedup). 0: off (a hub's retry is still stored once).
    duplicate_detection_window: Duration = Field(2 * 86400, ge=0)
    # When a message is acknowledged (SMTP 250, the API's 202, the pickup acknowledgement):
    # "replica", once a replica of Redis has it (WAIT); "local", once the primary has it;
    # "auto", "replica" for a Sentinel-managed Redis or a primary with replicas or
    # min-replicas-to-write, else "local" (mailyard.durability).
    durability: Durability = "auto"
    # Send connectors' ConnectionInactivityTimeOut (Exchange 2010: 10 min): how long an SMTP
    # peer may stay silent (connecting, answering a command, taking DATA) before giving up.
    smtp_inactivity_timeout: Duration = 600
    # Back pressure thresholds, Normal / Medium / High (see mailyard.hub.pressure). Memory is
    # a percentage of Redis's maxmemory (ignored without one); the others count messages.
    pressure_memory_normal: float = Field(70, ge=0, le=100)
    pressure_memory_medium: float = Field(80, ge=0, le=100)
    pressure_memory_high: float = Field(90, ge=0, le=100)
    pressure_submission_normal: int = Field(1000, ge=0)
    pressure_submission_medium: int = Field(2000, ge=0)
    pressure_submission_high: int = Field(4000, ge=0)
    pressure_backlog_normal: int = Field(50_000, ge=0)
    pressure_backlog_medium: int = Field(100_000, ge=0)
    pressure_backlog_high: int = Field(200_000, ge=0)
    # Failed SMTP logons, counted in Redis across connections and hubs (mailyard.hub.lockout):
    # a source (an IPv4 address, an IPv6 /64) that fails this often within the window is
    # refused every logon for the lockout duration, right password or not; an account that
    # fails this often from anywhere is locked for the sources that failed on it, never for
    # one that did not (its owner elsewhere), so that guessing cannot lock a user out. 0: off.
    logon_failures_per_source: int = Field(10, ge=0)
    logon_failures_per_account: int = Field(30, ge=0)
    logon_failure_window: Duration = 10 * 60
    logon_lockout_duration: Duration = 15 * 60
    # 5xx replies to clients that did not log on, counted per source across connections and
    # hubs over the same window: at this many the source gets 421 4.7.0 on connecting until
    # the window ends (a harvester that reconnects for every guess escapes the per-session
    # limit, max_protocol_errors, and the tarpit's wait). 0: off.
    protocol_errors_per_source: int = Field(100, ge=0)
    # No longer used: hubs and mailbox servers prove who they are with certificates of the
    # organization's CA (mailyard.pki). Still accepted in a file, so that an older one
    # validates, but never stored, and it opens nothing.
    server_token: str = Field("", exclude=True, description="ignored (see mailyard.pki)")
    dns_servers: list[str] = Field(default_factory=list)  # empty: the system resolver
    # Set-OrganizationConfig -SCLJunkThreshold: mail an Edge's content filter gave a higher
    # spam confidence level goes to the mailbox's Junk Email folder (mailyard.mailbox.store)
    scl_junk_threshold: int = Field(4, ge=0, le=9)


def _check_pressure(t: TransportSettings) -> list[tuple[tuple[Any, ...], str]]:
    problems = []
    for name in ("memory", "submission", "backlog"):
        n, m, h = (getattr(t, f"pressure_{name}_{lv}") for lv in ("normal", "medium", "high"))
        if not n <= m <= h:
            problems.append((("transport", f"pressure_{name}_medium"),
                             f"pressure thresholds must rise: normal {n} <= medium {m} <= high {h}"))
    return problems


class Site(_Model):
    name: Name
    mailbox_servers: list[Name] = Field(default_factory=list)


class SiteLink(_Model):
    name: Name
    sites: list[Name] = Field(min_length=2)
    cost: int = Field(10, ge=1, le=100)


class Mailbox(_Model):
    address: Address
    name: str = ""
    aliases: list[Address] = Field(default_factory=list)
    server: Name
    # For SMTP AUTH on receive connectors and the mailbox API; empty: cannot log on. In clear
    # or a hash in the file; always a hash once applied (mailyard.orgstore.apply_org).
    password: Password = ""
    # Who else may act on this mailbox (mailbox addresses or operator names), as Exchange
    # grants it: read it (Add-MailboxPermission -AccessRights FullAccess), send as it
    # (Add-ADPermission -ExtendedRights Send-As), send on its behalf (GrantSendOnBehalfTo).
    full_access: list[str] = Field(default_factory=list)
    send_as: list[str] = Field(default_factory=list)
    send_on_behalf: list[str] = Field(default_factory=list)

    @field_validator("full_access", "send_as", "send_on_behalf", mode="before")
    @classmethod
    def _principals(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [canonical(v) if isinstance(v, str) and "@" in v else v for v in value]
        return value


Right = Literal["FullAccess", "SendAs", "SendOnBehalf"]
RIGHTS: tuple[str, ...] = get_args(Right)


class Operator(_Model):
    """Someone who runs the organization rather than a mailbox: the local operator of
    ``mailyard site up``, a help desk. Logs on to mailbox servers with its name and password
    and holds ``rights`` on every mailbox of the organization."""

    name: Name
    # Empty: `mailyard site up` generates one and keeps it in <data-dir>/secrets.toml [operator].
    password: Password = ""
    rights: list[Right] = Field(default_factory=list)


class Group(_Model):
    address: Address
    name: str = ""
    members: list[Address] = Field(default_factory=list)
    # RequireSenderAuthenticationEnabled: only logged-on senders (and other hubs) may send to it
    require_sender_authentication: bool = True


class Contact(_Model):
    name: str = ""
    external_address: Address
    address: Address | None = None  # optional address in an accepted domain


class AddressSpace(_Model):
    type: str = "SMTP"
    space: str
    cost: int = Field(1, ge=1, le=100)

    @classmethod
    def parse(cls, value: object) -> object:
        """``"SMTP:*.contoso.com;5"``, ``"*"`` or a table with type, space and cost."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        kind, sep, rest = text.partition(":")
        if not sep:
            kind, rest = "SMTP", text
        space, sep, cost = rest.partition(";")
        return {"type": kind, "space": space.strip().lower(), "cost": cost.strip() or 1}

    @field_validator("space")
    @classmethod
    def _space(cls, value: str) -> str:
        if value == "*":
            return value
        wildcard = "*." if value.startswith("*.") else ""
        try:
            return wildcard + normalize_domain(value.removeprefix(wildcard))
        except ValueError:
            raise ValueError(
                f"{value!r} is not an SMTP address space: use *, *.example.com or example.com"
            ) from None

    def __str__(self) -> str:
        return f"{self.type}:{self.space};{self.cost}"


class SendConnector(_Model):
    name: Name
    address_spaces: list[Annotated[AddressSpace, BeforeValidator(AddressSpace.parse)]] = Field(
        min_length=1
    )
    dns_routing: bool = True
    smart_hosts: list[str] = Field(default_factory=list)
    smart_host_username: str = ""
    smart_host_password: str = ""  # kept in clear in Redis (a hub sends it to the smart host); never shown
    port: int = Field(25, ge=1, le=65535)
    source_sites: list[Name] = Field(default_factory=list)
    source_servers: list[str] = Field(default_factory=list)
    # Edge subscriptions among its source servers (Exchange's "EdgeSync - <Site> to Internet"):
    # the hubs of source_sites reach it by relaying to one of these Edges over mutually
    # authenticated TLS, and the Edge delivers as the connector says (mailyard.edgesync).
    source_edges: list[Name] = Field(default_factory=list)
    max_message_size: Size = 10 * 1024 * 1024
    # Outbound TLS, as Exchange's Set-SendConnector: opportunistic (STARTTLS when offered, any
    # certificate) unless require_tls; with it, tls_auth_level says what the peer's certificate
    # must prove, against the system's CA store: nothing (EncryptionOnly, the default), a valid
    # chain (CertificateValidation), or a chain for tls_domain, else the host's own name
    # (DomainValidation). A smart host's password is only ever sent inside TLS.
    require_tls: bool = False
    tls_auth_level: TlsAuthLevel | None = None
    tls_domain: Domain | None = None
    enabled: bool = True


class EdgeSubscription(_Model):
    """An Edge Transport server subscribed to a site (``mailyard org edge import``, Exchange's
    New-EdgeSubscription -FileData -Site): the hubs of ``site`` push EdgeSync data to it, take
    mail from it and send mail for the Internet through it. Made by the import, never written
    in the organization file (``org apply`` keeps the stored ones)."""

    name: Name
    site: Name
    fqdn: str
    smtp: str  # HOST:PORT: its receive connector, where the hubs deliver to it
    sync: str  # HOST:PORT: its EdgeSync listener (HTTPS)
    certificate: str  # its own self-signed certificate (PEM): EdgeSync pins it
    issued: str  # the organization CA's certificate for its key (PEM): SMTP between it and the hubs
    recipient_salt: str  # EdgeSync's recipients cross as SHA-256 of this and the address
    created: float = 0.0


class DkimKey(_Model):
    """A domain's DKIM key (mailyard.dkim_keys): made by ``mailyard org dkim new``, never
    written in the organization file. It signs once active (``org dkim activate``, after its
    TXT record is published); until then it is pending and the domain's previous key signs."""

    domain: Domain
    selector: str = Field(pattern=r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")  # a DNS label
    private_key: str = Field(repr=False)  # PEM, PKCS#8
    created: float = 0.0
    active: bool = True  # False: pending (keys made before pending existed all signed)


def _rewrite_side(value: str) -> str:
    """One side of an address rewrite entry: an address, a domain or (inside only) ``*.domain``,
    in its canonical form."""
    if not isinstance(value, str):
        raise ValueError("expected an address, a domain or *.domain")
    if "@" in value:
        return normalize_address(value)
    if value.startswith("*."):
        return "*." + normalize_domain(value[2:])
    return normalize_domain(value)


RewriteSide = Annotated[str, BeforeValidator(_rewrite_side)]


class AddressRewrite(_Model):
    """New-AddressRewriteEntry: on an Edge, the organization's ``internal_address`` (one
    address, a domain, or ``*.domain``: its subdomains) leaves for the Internet as
    ``external_address`` (an address, or a domain: the local part kept), and, unless
    ``outbound_only``, mail from the Internet to the external form comes in to the internal
    one (mailyard.hub.address_rewrite)."""

    name: Name
    internal_address: RewriteSide
    external_address: RewriteSide
    outbound_only: bool = False
    exception_list: list[Domain] = Field(default_factory=list)  # with *.domain: subdomains left as they are

    @property
    def wildcard(self) -> bool:
        return self.internal_address.startswith("*.")

    @property
    def is_address(self) -> bool:
        return "@" in self.internal_address


class EdgeRole(_Model):
    """Only in an Edge's own copy of the organization (written by EdgeSync on the Edge, never
    by ``org apply``): which Edge this is and the hubs of the site it is subscribed to."""

    name: Name
    site: Name
    hubs: list[str] = Field(default_factory=list)  # HOST:PORT of the site's hubs' connector for servers
    recipient_salt: str = ""  # how EdgeSync's recipient hashes were made (mailyard.edgesync)
    dkim: list[DkimKey] = Field(default_factory=list)  # it signs what leaves for the Internet
    rspamd: str = ""  # its content filter's URL (mailyard.hub.content_filter); "": none


class BlockListProvider(_Model):
    """Add-IPBlockListProvider: a DNS block list (RFC 5782) asked about each client's IPv4
    address at RCPT. ``bitmask``/``addresses``: which answers count (none: any 127.0.0.0/8
    answer except the usual error codes 127.255.255.x)."""

    name: Name
    lookup_domain: Domain
    bitmask: int | None = Field(None, ge=1, le=255)
    addresses: list[str] = Field(default_factory=list)
    rejection_response: str = Field("", max_length=240)  # {0} the IP, {1} the provider, {2} the lookup domain

    @field_validator("rejection_response")
    @classmethod
    def _response(cls, value: str) -> str:
        if "\r" in value or "\n" in value:
            raise ValueError("must be one line")
        try:
            value.format("192.0.2.1", "provider", "bl.example")
        except (IndexError, KeyError, ValueError):
            raise ValueError("may use only {0} (the IP), {1} (the provider) and {2} (the lookup domain); "
                             "write {{ and }} for braces") from None
        return value

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, values: list[str]) -> list[str]:
        for value in values:
            if not value.startswith("127."):
                raise ValueError(f"{value!r}: a block list answers with addresses in 127.0.0.0/8")
            ipaddress.IPv4Address(value)
        return values


# Exchange's default attachment filter entries (reference §3; mailyard.hub.attachment_filter)
_ATTACHMENT_TYPES = (
    "application/hta", "application/javascript", "application/msaccess", "application/prg",
    "application/x-javascript", "application/x-msdownload", "message/partial", "text/javascript",
    "text/scriptlet", "x-internet-signup",
)
_ATTACHMENT_EXTENSIONS = (
    "ade adp app asx bas bat chm cmd com cpl crt csh exe fxp hlp hta inf ins isp js jse ksh lnk mda mdb mde mdt "
    "mdw mdz msc msi msp mst ops pcd pif prf prg ps1 ps1xml ps11 ps11xml ps2 ps2xml psc1 psc2 reg scf scr sct shb "
    "shs url vb vbe vbs wsc wsf wsh xnk"
)
_ATTACHMENT_NAMES = tuple(f"*.{ext}" for ext in _ATTACHMENT_EXTENSIONS.split())


class AntispamSettings(_Model):
    """The Edge's anti-spam agents, in Exchange's order (mailyard.hub.antispam). They run on
    Edge Transport servers only (Exchange's AntispamAgentsEnabled is $true only there), for
    sessions without the bypass right (a logged-on user, an Exchange server)."""

    # Connection filtering (Set-IPAllowListConfig, Set-IPBlockListConfig, block list providers)
    ip_allow_list: list[str] = Field(default_factory=list)  # IP ranges: skip every later agent
    ip_block_list: list[str] = Field(default_factory=list)
    block_list_providers: list[BlockListProvider] = Field(default_factory=list)
    # Sender filtering (Set-SenderFilterConfig), at MAIL FROM: 554 5.1.0 Sender Denied
    blocked_senders: list[Address] = Field(default_factory=list)
    blocked_domains: list[Domain] = Field(default_factory=list)
    blocked_domains_and_subdomains: list[Domain] = Field(default_factory=list)
    blank_sender_blocking: bool = False
    # Recipient filtering (Set-RecipientFilterConfig), at RCPT: 550 5.1.1 User unknown after
    # the receive connector's tarpit. Exchange's RecipientValidationEnabled is off by default;
    # with EdgeSync's recipients at hand, Mailyard's is on.
    recipient_validation: bool = True
    blocked_recipients: list[Address] = Field(default_factory=list)
    # Sender authentication at the end of DATA (mailyard.hub.sender_auth): SPF, DKIM and DMARC
    # into an Authentication-Results header. Exchange's Sender ID SpoofedDomainAction is
    # StampStatus by default; a DMARC p=reject is honored unless dmarc_enforce is off.
    sender_authentication: bool = True
    spf_fail_action: Literal["StampStatus", "Reject"] = "StampStatus"
    dmarc_enforce: bool = True
    # Content filtering by rspamd (Set-ContentFilterConfig, mailyard.hub.content_filter)
    content_filtering: bool = True
    scl_reject_enabled: bool = True
    scl_reject_threshold: int = Field(7, ge=0, le=9)
    scl_delete_enabled: bool = False
    scl_delete_threshold: int = Field(9, ge=0, le=9)
    content_reject_response: str = Field("Message rejected due to content restrictions", max_length=240)
    # Attachment filtering (Set-AttachmentFilterListConfig, mailyard.hub.attachment_filter)
    attachment_filtering: bool = True
    attachment_action: Literal["Reject", "Strip", "SilentDelete"] = "Reject"
    attachment_reject_response: str = Field("Message rejected due to unacceptable attachments", max_length=240)
    attachment_admin_message: str = "This attachment was removed."
    attachment_file_names: list[str] = Field(default_factory=lambda: list(_ATTACHMENT_NAMES))
    attachment_content_types: list[str] = Field(default_factory=lambda: list(_ATTACHMENT_TYPES))

    @field_validator("ip_allow_list", "ip_block_list")
    @classmethod
    def _ranges(cls, values: list[str]) -> list[str]:
        for value in values:
            parse_ip_range(value)
        return values


class ReceiveConnector(_Model):
    name: Name
    sites: list[Name] = Field(default_factory=list)  # empty: every site's hubs
    bindings: list[str] = Field(default_factory=lambda: ["0.0.0.0:25"], min_length=1)
    remote_ip_ranges: list[str] = Field(default_factory=lambda: ["0.0.0.0-255.255.255.255"])
    permission_groups: list[PermissionGroup] = Field(default_factory=lambda: _DEFAULT_GROUPS.copy())
    auth_mechanisms: list[AuthMechanism] = Field(default_factory=lambda: _DEFAULT_MECHANISMS.copy())
    max_message_size: Size = 10 * 1024 * 1024
    max_recipients_per_message: int = Field(200, ge=1, le=512000)
    max_hop_count: int = Field(30, ge=1, le=500)
    max_inbound_connection: int = Field(5000, ge=1)  # per hub
    max_inbound_connection_per_source: int = Field(20, ge=1)  # an IPv6 source is its /64
    max_logon_failures: int = Field(3, ge=0)
    # 5xx replies to a client that has not logged on; the 535s count as logon failures instead
    max_protocol_errors: int = Field(10, ge=0)
    tarpit_interval: Duration = Field(5, le=600)  # before each 5xx to a client not logged on
    auth_tarpit_interval: Duration = Field(5, le=600)  # before each failed logon's reply
    connection_inactivity_timeout: Duration = Field(5 * 60, gt=0)  # any bytes received reset it
    connection_timeout: Duration = Field(10 * 60, gt=0)  # the whole session
    banner: str = ""
    fqdn: str = ""
    enabled: bool = True

    @field_validator("bindings")
    @classmethod
    def _bindings(cls, values: list[str]) -> list[str]:
        for value in values:
            host, sep, port = value.rpartition(":")
            try:
                ipaddress.ip_address(host.strip("[]"))
                ok = bool(sep) and 0 <= int(port) <= 65535
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{value!r} is not a binding: write IP:port, e.g. 0.0.0.0:25")
        return values

    @field_validator("remote_ip_ranges")
    @classmethod
    def _ranges(cls, values: list[str]) -> list[str]:
        for value in values:
            parse_ip_range(value)
        return values


def parse_ip_range(
    value: str,
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """``"10.0.0.0/8"``, ``"10.0.0.1-10.0.0.9"`` or a single address, as (first, last)."""
    try:
        if "-" in value:
            lo, hi = (ipaddress.ip_address(part.strip()) for part in value.split("-", 1))
            if lo.version != hi.version or int(lo) > int(hi):
                raise ValueError
            return lo, hi
        net = ipaddress.ip_network(value.strip(), strict=False)
        return net[0], net[-1]
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP range: write 10.0.0.0/8, 10.0.0.1-10.0.0.9 or one address"
        ) from None


class Organization(_Model):
    name: str = "Organization"
    accepted_domains: list[Domain] = Field(min_length=1)
    postmaster: Address | None = None
    transport: TransportSettings = Field(default_factory=TransportSettings)
    sites: list[Site] = Field(min_length=1)
    site_links: list[SiteLink] = Field(default_factory=list)
    mailboxes: list[Mailbox] = Field(default_factory=list)
    operators: list[Operator] = Field(default_factory=list)
    groups: list[Group] = Field(default_factory=list)
    contacts: list[Contact] = Field(default_factory=list)
    send_connectors: list[SendConnector] = Field(default_factory=list)
    receive_connectors: list[ReceiveConnector] = Field(default_factory=list)
    antispam: AntispamSettings = Field(default_factory=AntispamSettings)
    address_rewrites: list[AddressRewrite] = Field(default_factory=list)  # applied on Edges
    edge_subscriptions: list[EdgeSubscription] = Field(default_factory=list)
    edge: EdgeRole | None = None

    @property
    def postmaster_address(self) -> str:
        return self.postmaster or f"postmaster@{self.accepted_domains[0]}"

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> Organization:
        return cls.model_validate_json(text)


# region: loading and validation


def load_org(path: str | Path) -> Organization:
    """Read, parse and validate an organization file; raise ConfigError naming each problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem("(file)", exc.strerror or str(exc))], str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigProblem("(file)", "is not UTF-8 text")], str(path)) from None
    return parse_org(text, source=str(path))


def parse_org(text: str, source: str = "") -> Organization:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _toml_error_line(str(exc))
        raise ConfigError([ConfigProblem("(syntax)", str(exc), line)], source) from None
    lines = _key_lines(text)
    try:
        org = Organization.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            path = tuple(p for p in err["loc"] if isinstance(p, int) or "[" not in str(p))
            problems.append(ConfigProblem(_dotted(path), _message(err), _line_for(lines, path)))
        raise ConfigError(problems, source) from None
    problems = [
        ConfigProblem(_dotted(path), message, _line_for(lines, path))
        for path, message in check_references(org)
    ]
    # Made by `mailyard org edge import` and by EdgeSync on an Edge, never written in a file
    # (a file's would bring back a removed Edge, or turn every hub into an Edge)
    for key, present in (("edge_subscriptions", bool(org.edge_subscriptions)), ("edge", org.edge is not None)):
        if present:
            problems.append(ConfigProblem(key, "is not written in the organization file: `mailyard org edge "
                                               "import` makes Edge subscriptions", _line_for(lines, (key,))))
    if problems:
        raise ConfigError(problems, source)
    return org


def _message(err: Any) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key (check its spelling; see deploy/contoso.toml for every key)"
    if kind == "missing":
        return "is required"
    msg = str(err.get("msg", "invalid"))
    return msg.removeprefix("Value error, ")


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def check_references(org: Organization) -> list[tuple[tuple[Any, ...], str]]:
    """Cross-checks a schema cannot express: names that must exist, must be unique, etc."""
    problems: list[tuple[tuple[Any, ...], str]] = _check_pressure(org.transport)
    accepted = set(org.accepted_domains)
    sites = {s.name for s in org.sites}
    servers: dict[str, str] = {}
    for i, site in enumerate(org.sites):
        if [s.name for s in org.sites].count(site.name) > 1:
            problems.append((("sites", i, "name"), f"site {site.name!r} is defined twice"))
        for j, server in enumerate(site.mailbox_servers):
            if server in servers:
                problems.append(
                    (
                        ("sites", i, "mailbox_servers", j),
                        f"mailbox server {server!r} is already in site {servers[server]!r}",
                    )
                )
            servers[server] = site.name
    # Each site's hubs and each mailbox server have a certificate named after them as a DNS
    # label (mailyard.pki): two names that make the same label would share one identity.
    labels: dict[str, str] = {}
    for i, site in enumerate(org.sites):
        for path, role, name in ((("sites", i, "name"), "hub", site.name),
                                 *((("sites", i, "mailbox_servers", j), "mailbox", server)
                                   for j, server in enumerate(site.mailbox_servers))):
            label = pki.dns_label(name)
            if not label:
                problems.append((path, f"{name!r} cannot name a certificate (a DNS label of 1 to 63 characters)"))
            elif labels.setdefault(f"{role}:{label}", name) != name:
                problems.append((path, f"{name!r} and {labels[role + ':' + label]!r} would share one certificate "
                                       f"identity ({label}); rename one"))
    for i, link in enumerate(org.site_links):
        for j, name in enumerate(link.sites):
            if name not in sites:
                problems.append((("site_links", i, "sites", j), f"no site named {name!r}"))

    owners: dict[str, tuple[Any, ...]] = {}

    def claim(address: str, path: tuple[Any, ...], in_org: bool = True) -> None:
        if address in owners:
            problems.append((path, f"{address} is already used at {_dotted(owners[address])}"))
            return
        owners[address] = path
        if in_org and address.rpartition("@")[2] not in accepted:
            problems.append(
                (path, f"{address} is not in an accepted domain ({', '.join(org.accepted_domains)})")
            )

    for i, mb in enumerate(org.mailboxes):
        claim(mb.address, ("mailboxes", i, "address"))
        for j, alias in enumerate(mb.aliases):
            claim(alias, ("mailboxes", i, "aliases", j))
        if mb.server not in servers:
            problems.append((("mailboxes", i, "server"), f"no mailbox server named {mb.server!r}"))
    for i, group in enumerate(org.groups):
        claim(group.address, ("groups", i, "address"))
    operators = [op.name for op in org.operators]
    for i, op in enumerate(org.operators):
        if operators.count(op.name) > 1:
            problems.append((("operators", i, "name"), f"operator {op.name!r} is defined twice"))
    mailbox_addresses = {mb.address for mb in org.mailboxes}
    for i, mb in enumerate(org.mailboxes):
        for field in ("full_access", "send_as", "send_on_behalf"):
            for j, who in enumerate(getattr(mb, field)):
                if who not in mailbox_addresses and who not in operators:
                    problems.append((("mailboxes", i, field, j),
                                     f"{who!r} is not a mailbox (primary address) or operator of this organization"))
    for i, contact in enumerate(org.contacts):
        if contact.external_address.rpartition("@")[2] in accepted:
            problems.append(
                (
                    ("contacts", i, "external_address"),
                    "a contact's external address must be outside the accepted domains",
                )
            )
        if contact.address:
            claim(contact.address, ("contacts", i, "address"))
    contact_externals = {c.external_address for c in org.contacts}
    for i, group in enumerate(org.groups):
        for j, member in enumerate(group.members):
            if member not in owners and member not in contact_externals:
                problems.append(
                    (
                        ("groups", i, "members", j),
                        f"{member} is not a mailbox, group or contact of this organization",
                    )
                )
    names: set[str] = set()
    for i, conn in enumerate(org.send_connectors):
        if conn.name in names:
            problems.append((("send_connectors", i, "name"), f"{conn.name!r} is defined twice"))
        names.add(conn.name)
        if not conn.dns_routing and not conn.smart_hosts:
            problems.append(
                (("send_connectors", i, "smart_hosts"), "needs smart hosts when dns_routing = false")
            )
        for j, name in enumerate(conn.source_sites):
            if name not in sites:
                problems.append((("send_connectors", i, "source_sites", j), f"no site {name!r}"))
        if conn.tls_auth_level and not conn.require_tls:
            problems.append((("send_connectors", i, "tls_auth_level"), "needs require_tls = true"))
        if conn.tls_domain and conn.tls_auth_level != "DomainValidation":
            problems.append((("send_connectors", i, "tls_domain"), 'needs tls_auth_level = "DomainValidation"'))
        for j, name in enumerate(conn.source_edges):
            if org.edge is None and name not in {e.name for e in org.edge_subscriptions}:
                problems.append((("send_connectors", i, "source_edges", j),
                                 f"no Edge subscription {name!r} (`mailyard org edge list`)"))
    edge_labels = [pki.dns_label(e.name) for e in org.edge_subscriptions]
    for i, sub in enumerate(org.edge_subscriptions):
        if edge_labels.count(pki.dns_label(sub.name)) > 1:
            problems.append((("edge_subscriptions", i, "name"),
                             f"Edge {sub.name!r} is subscribed twice (or two Edges share its certificate name)"))
        if sub.site not in sites:
            problems.append((("edge_subscriptions", i, "site"), f"no site {sub.site!r}"))
        if not pki.dns_label(sub.name):
            problems.append((("edge_subscriptions", i, "name"), f"{sub.name!r} cannot name a certificate"))
    names = set()
    for i, rc in enumerate(org.receive_connectors):
        if rc.name in names:
            problems.append((("receive_connectors", i, "name"), f"{rc.name!r} is defined twice"))
        names.add(rc.name)
        for j, name in enumerate(rc.sites):
            if name not in sites:
                problems.append((("receive_connectors", i, "sites", j), f"no site {name!r}"))
        if "BasicAuthRequireTLS" in rc.auth_mechanisms and not {"Tls", "BasicAuth"} <= set(
            rc.auth_mechanisms
        ):
            problems.append(
                (("receive_connectors", i, "auth_mechanisms"), "BasicAuthRequireTLS needs Tls and BasicAuth")
            )
        if "ExternalAuthoritative" in rc.auth_mechanisms and "ExchangeServers" not in rc.permission_groups:
            problems.append((("receive_connectors", i, "auth_mechanisms"),
                             "ExternalAuthoritative needs the ExchangeServers permission group"))
        if rc.connection_timeout <= rc.connection_inactivity_timeout:
            problems.append((("receive_connectors", i, "connection_timeout"),
                             "must be longer than connection_inactivity_timeout"))
    return problems + _check_rewrites(org)


def _check_rewrites(org: Organization) -> list[tuple[tuple[Any, ...], str]]:
    """New-AddressRewriteEntry's rules: an address maps to an address and a domain to a
    domain; ``*.domain`` is outbound only (which subdomain would mail to the external domain
    go to?) and alone has exceptions; one entry per internal address and per name; and an
    entry that rewrites inbound names an accepted domain outside, or the Edge would refuse
    the mail as a relay before rewriting it."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    seen: dict[str, str] = {}
    names: set[str] = set()
    for i, entry in enumerate(org.address_rewrites):
        at = ("address_rewrites", i)
        if entry.name in names:
            problems.append(((*at, "name"), f"{entry.name!r} is defined twice"))
        names.add(entry.name)
        if entry.internal_address in seen:
            problems.append(((*at, "internal_address"),
                             f"{entry.internal_address} is already rewritten by {seen[entry.internal_address]!r}"))
        seen.setdefault(entry.internal_address, entry.name)
        external = entry.external_address
        if external.startswith("*."):
            problems.append(((*at, "external_address"), "must be an address or a domain (no *.)"))
        elif ("@" in external) != entry.is_address:
            problems.append(((*at, "external_address"),
                             "must be an address when internal_address is one, else a domain"))
        if entry.wildcard and not entry.outbound_only:
            problems.append(((*at, "outbound_only"), "must be true for a *.domain entry"))
        if entry.exception_list and not entry.wildcard:
            problems.append(((*at, "exception_list"), "applies only to a *.domain entry"))
        parent = entry.internal_address[2:]
        for j, domain in enumerate(entry.exception_list):
            if not domain.endswith("." + parent):
                problems.append(((*at, "exception_list", j), f"{domain} is not a subdomain of {parent}"))
        domain = external.rpartition("@")[2]
        if not entry.outbound_only and domain not in org.accepted_domains:
            problems.append(((*at, "external_address"),
                             f"{domain} is not an accepted domain: mail to it would not come in to be "
                             "rewritten (accept it, or set outbound_only = true)"))
    return problems


# endregion

# region: mapping a key path back to its line in the TOML text

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")


def _key_lines(text: str) -> dict[tuple[Any, ...], int]:
    """Best-effort map from key paths (("mailboxes", 3, "server")) to 1-based line numbers.

    Covers tables, arrays of tables and ``key = value`` lines, which is how organization
    files are written; anything else falls back to the nearest enclosing table's line.
    """
    where: dict[tuple[Any, ...], int] = {}
    counters: dict[tuple[Any, ...], int] = {}
    table: tuple[Any, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        if m := _HEADER.match(line):
            parts = tuple(p.strip().strip("\"'") for p in m.group(2).split("."))
            if m.group(1) == "[[":
                index = counters.get(parts, -1) + 1
                counters[parts] = index
                table = (*parts, index)
            else:
                table = parts
            where.setdefault(table, number)
            continue
        if m := _ASSIGN.match(line):
            key = m.group(1).strip('"')
            where.setdefault((*table, key), number)
    return where


def _line_for(lines: dict[tuple[Any, ...], int], path: tuple[Any, ...]) -> int | None:
    for cut in range(len(path), 0, -1):
        if path[:cut] in lines:
            return lines[path[:cut]]
    return None


def _toml_error_line(message: str) -> int | None:
    m = re.search(r"line (\d+)", message)
    return int(m.group(1)) if m else None


# endregion
