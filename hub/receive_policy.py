"""Receive connectors' policy: who may do what, as an Exchange 2010 hub decides it.

Every decision here is a pure function of the connector, the client's identity, the
directory and what the client sent; nothing here reads a socket or Redis (the session in
``receive_protocol`` and the handler in ``receive_handler`` ask, and act on the answer).

- Which connector: each connection is matched to the connector of its listening address
  whose remote IP range matches the client most specifically (``receive_connector_for``).
- What it offers (``session_rules``): STARTTLS (Tls), AUTH PLAIN/LOGIN (BasicAuth), AUTH
  only after STARTTLS (BasicAuthRequireTLS); with ExchangeServer, STARTTLS asks the client for
  a certificate of the organization's CA, and a hub that presents its site's is an Exchange
  server without any AUTH (``certificate_logon``: mutual TLS, the way Exchange's
  ExchangeServer authentication with direct trust works); with ExternalAuthoritative every
  client the remote IP ranges admit is an Exchange server without a logon (the link is
  secured by other means).
- Who may submit (permission groups, ``granted_groups``): AnonymousUsers, ExchangeUsers (a
  mailbox that logged on), ExchangeServers (another hub, by its certificate), Partners; a
  client with none of them gets ``530 5.7.1 Client was not authenticated``, and a user sends
  only as one of its own addresses.
- Who may relay (``rcpt_to``): ExchangeUsers and ExchangeServers; anyone else may only send
  to the accepted domains (``550 5.7.1 Unable to relay``), and only to recipients that exist
  (``550 5.1.1 User unknown``).
- Limits: message size (advertised with SIZE, ``552 5.3.4``; a hub relaying within the
  organization is exempt), recipients per message (``452 4.5.3``), hop count (``554 5.4.6``),
  connections per source, failed logons; back pressure at MAIL FROM (``452 4.3.1``).

A refused command raises ``Refused``, which carries the reply.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from email.message import Message

from mailyard import headers, passwords, pki
from mailyard.directory import Directory, Principal
from mailyard.hub import replies
from mailyard.hub.pressure import Level
from mailyard.org import Organization, ReceiveConnector, normalize_address, parse_ip_range

RELAY_GROUPS = frozenset({"ExchangeUsers", "ExchangeServers"})
USER_LOGONS = frozenset({"BasicAuth", "BasicAuthRequireTLS"})  # mechanisms a mailbox logs on with
SERVER_LOGON = "ExchangeServer"  # hubs, by their certificate after STARTTLS: never with AUTH


class Refused(Exception):
    """A command the connector refuses; ``reply`` is what the client is told."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class Identity:
    """Who the client is: a mailbox that logged on (ExchangeUsers) or another hub (ExchangeServers)."""

    kind: str  # "user" or "server"
    name: str  # the mailbox's primary address, or the hub's name
    addresses: frozenset[str] = frozenset()  # a user's: its primary address and its aliases
    # False for a server by address only (ExternalAuthoritative: an appliance in front, which
    # passes on what the Internet wrote): the organization's own headers are trusted only from
    # a node that proved itself with the organization's certificate
    proven: bool = True

    @property
    def organization_node(self) -> bool:
        """A hub or a subscribed Edge, by its certificate: whose organization headers count."""
        return self.kind == "server" and self.proven


# region: which connector, and what a session on it offers


def connectors_for(org: Organization, binding: str, site: str) -> list[ReceiveConnector]:
    """The connectors a listener on ``binding`` serves for a hub of ``site``."""
    return [c for c in org.receive_connectors if binding in c.bindings and (not c.sites or site in c.sites)]


def receive_connector_for(connectors: list[ReceiveConnector], ip: str) -> ReceiveConnector | None:
    """The enabled connector whose remote IP range matches ``ip`` most specifically."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    best: tuple[int, ReceiveConnector] | None = None
    for conn in connectors:
        if not conn.enabled:
            continue
        for text in conn.remote_ip_ranges:
            lo, hi = parse_ip_range(text)
            if lo.version != addr.version or not int(lo) <= int(addr) <= int(hi):
                continue
            size = int(hi) - int(lo)
            if best is None or size < best[0]:
                best = (size, conn)
    return best[1] if best else None


@dataclass(frozen=True)
class SessionRules:
    """What a session on one connector offers its client."""

    size_limit: int  # advertised with SIZE
    starttls: bool  # Tls
    auth_methods: frozenset[str]  # of PLAIN and LOGIN; none without a mailbox logon (BasicAuth)
    auth_require_tls: bool  # BasicAuthRequireTLS: AUTH only after STARTTLS
    client_certs: bool  # ExchangeServer: STARTTLS asks for a certificate of the organization's CA
    implicit: Identity | None  # ExternalAuthoritative: the client is an Exchange server without a logon
    ident: str | None  # the greeting's text after "220 <hostname> ", from the connector's banner
    hostname: str | None  # the connector's own FQDN, when it has one


def session_rules(conn: ReceiveConnector, client_ip: str) -> SessionRules:
    mechanisms = set(conn.auth_mechanisms)
    return SessionRules(
        size_limit=conn.max_message_size,
        starttls="Tls" in mechanisms,
        auth_methods=frozenset({"PLAIN", "LOGIN"}) if mechanisms & USER_LOGONS else frozenset(),
        auth_require_tls="BasicAuthRequireTLS" in mechanisms,
        client_certs="Tls" in mechanisms and SERVER_LOGON in mechanisms,
        implicit=Identity("server", f"[{client_ip}]", proven=False) if "ExternalAuthoritative" in mechanisms else None,
        ident=conn.banner.removeprefix("220 ").split(" ", 1)[-1] if conn.banner else None,
        hostname=conn.fqdn or None,
    )


def too_many_connections(conn: ReceiveConnector, open_from_source: int, open_on_connector: int) -> bool:
    """A new connection is one too many when its source already has
    MaxInboundConnectionPerSource open, or this hub's sessions on the connector MaxInboundConnection."""
    return (open_from_source >= conn.max_inbound_connection_per_source
            or open_on_connector >= conn.max_inbound_connection)


def too_many_logon_failures(conn: ReceiveConnector, failures: int) -> bool:
    """The connection is closed after this many failed logons (0: never)."""
    return bool(conn.max_logon_failures) and failures >= conn.max_logon_failures


def too_many_errors(conn: ReceiveConnector, errors: int) -> bool:
    """The connection is closed after this many 5xx replies to a client not logged on (0: never)."""
    return bool(conn.max_protocol_errors) and errors >= conn.max_protocol_errors


def tarpit(conn: ReceiveConnector, reply: str, trusted: bool) -> float:
    """Seconds to wait before sending ``reply``: AuthTarpitInterval before a failed logon's,
    TarpitInterval before any other 5xx to a client that has not proved who it is (a directory
    harvester's 550 5.1.1 among them). A logged-on client, or one the connector trusts, never waits."""
    if trusted:
        return 0.0
    if is_failed_logon(reply):
        return conn.auth_tarpit_interval
    return conn.tarpit_interval if reply.startswith("5") else 0.0


def is_failed_logon(reply: str) -> bool:
    """A reply that counts against MaxLogonFailures: a wrong password's, or a lockout's."""
    return reply.startswith("535") or reply == replies.LOGON_LOCKED


def is_error(reply: str) -> bool:
    """A reply that counts against MaxProtocolErrors: every 5xx but a failed logon's (those
    count against MaxLogonFailures)."""
    return reply.startswith("5") and not reply.startswith("535")


# endregion

# region: who the client is, and what it may do


def logon(directory: Directory, conn: ReceiveConnector, login: str, password: bytes) -> Identity | None:
    """AUTH: the identity a login and password prove on this connector, or None.

    Only a mailbox logs on with AUTH: its address (or an alias) and its password, where the
    connector has BasicAuth (checked against the stored hash: ``passwords.verify``, an scrypt
    unless the same password verified before; the session runs this off its event loop). No
    login makes a client an Exchange server: a hub proves itself with its certificate
    (``certificate_logon``), and no shared secret of the organization is a password here."""
    mechanisms = set(conn.auth_mechanisms)
    if not mechanisms & USER_LOGONS:
        return None
    entry = directory.mailbox_entry(login)
    stored = directory.password_hashes.get(entry.address, "") if entry else ""
    if not (entry and stored):
        passwords.verify_nothing(password)  # as long as a wrong password takes: no one is told who exists
        return None
    if passwords.verify(password, stored):
        return Identity("user", entry.address, directory.addresses_of(entry.address))
    return None


def mailbox_of(directory: Directory, login: str) -> str | None:
    """The mailbox (its primary address) a login names, or None: what failed logons count against."""
    entry = directory.mailbox_entry(login)
    return entry.address if entry else None


def authzid_refused(directory: Directory, login: str, authzid: str) -> bool:
    """AUTH PLAIN's authorization identity (RFC 4616): empty, or the mailbox that logs on (by
    any of its addresses). Acting as another mailbox is a right no one has over SMTP; SendAs
    and SendOnBehalf say whom a mailbox may send as once it has logged on as itself."""
    if not authzid:
        return False
    mine = mailbox_of(directory, login)
    return mine is None or mailbox_of(directory, authzid) != mine


def certificate_logon(directory: Directory, conn: ReceiveConnector, peer: pki.Identity | None, *,
                      site: str = "", certificate: bytes | None = None) -> Identity | None:
    """STARTTLS: the identity a verified client certificate proves on this connector, or None.

    ``peer`` is what the certificate names (``pki.peer_identity``; the session's TLS context
    verified it against the organization's CA and nothing else). A certificate of a site's hubs
    makes the client an Exchange server of that site, where the connector has ExchangeServer;
    a mailbox server's certificate, or one of a site the organization no longer has, proves
    nothing here. An Edge's certificate (``certificate``, DER) logs on at the hubs of the site it
    is subscribed to (``site``), and only while it is the one issued at its subscription: a
    certificate of an earlier subscription of the same name proves nothing."""
    if peer is None or SERVER_LOGON not in conn.auth_mechanisms:
        return None
    org = directory.org
    if peer.role == "edge":
        if certificate is None:
            return None
        found = pki.der_fingerprint(certificate)
        edge = next((e.name for e in org.edge_subscriptions if pki.matches(peer, pki.Identity.edge(e.name))
                     and e.site == site and pki.fingerprint(e.issued) == found), None)
        return Identity("server", edge) if edge else None
    if peer.role != "hub":
        return None
    if org.edge is not None:  # on an Edge: the hubs of the site it is subscribed to, and no others
        return Identity("server", org.edge.site) if pki.matches(peer, pki.Identity.hub(org.edge.site)) else None
    peer_site = next((s.name for s in org.sites if pki.matches(peer, pki.Identity.hub(s.name))), None)
    return Identity("server", peer_site) if peer_site else None


def granted_groups(conn: ReceiveConnector, identity: Identity | None) -> frozenset[str]:
    """The connector's permission groups this client is in: AnonymousUsers and Partners are
    everyone; ExchangeUsers a logged-on mailbox, ExchangeServers a hub."""
    granted = set(conn.permission_groups)
    have = {"AnonymousUsers", "Partners"} & granted
    if identity is not None and identity.kind == "user":
        have |= {"ExchangeUsers"} & granted
    if identity is not None and identity.kind == "server":
        have |= {"ExchangeServers"} & granted
    return frozenset(have)


def mail_from(conn: ReceiveConnector, identity: Identity | None, address: str,
              directory: Directory | None = None) -> str:
    """MAIL FROM: the sender, normalized ("" for the null sender ``<>``).

    Refused: a client in none of the connector's permission groups (``530 5.7.1``), a
    malformed address (``501 5.1.7``), a logged-on user sending as someone it has neither
    SendAs nor SendOnBehalf on in ``directory`` (``550 5.7.1``), whatever the connector's
    groups: a logon says who the client is, and that is who it sends as."""
    groups = granted_groups(conn, identity)
    if not groups:
        raise Refused(replies.NOT_AUTHENTICATED)
    sender = ""
    if address != "<>":
        try:
            sender = normalize_address(address)
        except ValueError:
            raise Refused(replies.INVALID_SENDER) from None
    if identity and identity.kind == "user" and sender and sender not in identity.addresses:
        who = Principal("mailbox", identity.name)
        if directory is None or not any(directory.may_on(who, right, sender) for right in ("SendAs", "SendOnBehalf")):
            raise Refused(replies.SEND_AS_DENIED)
    return sender


_HELO_CHARS = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


def received_name(helo: str | None) -> str:
    """What the client said in EHLO, as our Received header may carry it (RFC 5321 4.4): a
    domain or an address literal, anything else (a NUL, a line break, text made to look like
    a header) as "?", at most 255 characters."""
    if not helo:
        return "unknown"
    return _HELO_CHARS.sub("?", helo[:255]) or "unknown"


def header_senders_refusal(directory: Directory, identity: Identity | None, head: Message) -> str | None:
    """At DATA, for a logged-on user: may it send as every ``From`` of the message, and is its
    ``Sender`` (if any) itself? The rule of the mailbox API (``Directory.send_as_refusal``):
    Exchange's "Client does not have permissions to send as this sender". None: it may."""
    if identity is None or identity.kind != "user":
        return None
    try:
        senders = [a.lower() for _, a in headers.addresses(head, "From")]
        sender_field = [a.lower() for _, a in headers.addresses(head, "Sender")]
    except ValueError as exc:
        return str(exc)
    return directory.send_as_refusal(Principal("mailbox", identity.name), senders, sender_field)


def is_internal(identity: Identity | None) -> bool:
    """Mail from the organization, which Medium back pressure lets through: a client that
    proved who it is (logged on, or a hub by its certificate, or trusted by the connector).
    Never the envelope's domain, which any anonymous client may write."""
    return identity is not None


def pressure_refusal(level: Level, internal: bool) -> str | None:
    """Back pressure at MAIL FROM: High refuses everyone, Medium senders outside the organization."""
    if level is Level.HIGH or (level is Level.MEDIUM and not internal):
        return replies.NO_RESOURCES
    return None


def size_limit(conn: ReceiveConnector, identity: Identity | None) -> int | None:
    """The message size limit of this client's transaction (None: none).

    ms-Exch-Bypass-Message-Size-Limit: a hub relaying within the organization carries a
    message the first hub accepted, plus its own headers; the limits were applied there."""
    if identity is not None and identity.kind == "server":
        return None
    return conn.max_message_size


def rcpt_to(conn: ReceiveConnector, identity: Identity | None, address: str, directory: Directory,
            taken: int) -> str:
    """RCPT TO: the recipient, normalized, when ``taken`` recipients were accepted before it.

    Refused: one more than the connector's limit (``452 4.5.3``), a malformed address
    (``501 5.1.3``), an address of an accepted domain that does not exist (``550 5.1.1``),
    any other domain for a client that may not relay (``550 5.7.1``)."""
    if taken >= conn.max_recipients_per_message:
        raise Refused(replies.TOO_MANY_RECIPIENTS)
    postmaster = directory.org.postmaster_address
    if address.strip().lower() == "postmaster":  # RFC 5321 4.5.1: accepted without a domain
        address = postmaster
    try:
        rcpt = normalize_address(address)
    except ValueError:
        raise Refused(replies.INVALID_RECIPIENT) from None
    if directory.is_accepted(rcpt) and directory.edge:
        pass  # (an Edge: its recipient filter checks the address, mailyard.hub.antispam)
    elif directory.is_accepted(rcpt):
        if directory.lookup(rcpt) is None:
            # postmaster@ every accepted domain is the organization's postmaster (RFC 5321 4.5.1)
            if rcpt.partition("@")[0] == "postmaster" and directory.lookup(postmaster) is not None:
                return postmaster
            raise Refused(replies.USER_UNKNOWN)
        if identity is None and directory.requires_sender_authentication(rcpt):
            raise Refused(replies.AUTH_REQUIRED)
    elif not granted_groups(conn, identity) & RELAY_GROUPS:
        raise Refused(replies.UNABLE_TO_RELAY)
    return rcpt


def check_hops(conn: ReceiveConnector, identity: Identity | None, raw: bytes, org_hops: int) -> None:
    """DATA: a message that went around too often (``554 5.4.6``, a possible mail loop): with
    our own Received header it would have more than MaxHopCount.

    Refused here, at the first hub, rather than by a hub it is relayed to (a bounce, i.e.
    backscatter): a hub relaying within the organization is allowed ``org_hops`` more, the
    Received headers hubs add on the way (one per site a message crosses; least-cost routing
    crosses each site at most once), so whether a message arrives does not depend on where its
    recipient is, and a loop through the organization still ends."""
    allowed = conn.max_hop_count + (org_hops if identity is not None and identity.kind == "server" else 0)
    if headers.hop_count(raw) >= allowed:
        raise Refused(replies.HOP_COUNT)


def relay_origin(identity: Identity | None, value: str | None) -> str:
    """The origin id a relaying hub gave the message (its X-Mailyard-Origin header): trusted
    only from a node of the organization (by its certificate), ignored from anyone else."""
    if identity is None or not identity.organization_node or value is None:
        return ""
    return str(value).strip()


# endregion
