"""SMTP out: send connectors (DNS MX or smart hosts) and relay to hubs of other sites.

A drain task delivers a batch of one queue over one SMTP connection: EHLO, STARTTLS when
offered (opportunistic; required when the connector says so), AUTH where configured, then
MAIL, RCPT, DATA for each message (``send_transaction``: pipelined when the peer offers
PIPELINING), with RSET after a transaction that failed.

To a hub of another site the link is always TLS verified against the organization's CA
(``_org_tls``): STARTTLS is required, the peer's certificate must be issued by that CA for
the site's hubs (``<site>.hub.mailyard.internal``), and this hub presents its own site's
certificate, which logs it on as an Exchange server (mutual TLS; no AUTH, no secret). A peer
that offers no STARTTLS or presents another certificate gets nothing: the queue goes into
Retry with a 4.7.5 last error that says why. Each recipient gets its own
outcome: 2xx done, 4xx retried, 5xx NDR. If no target host can be reached the whole queue
goes into Retry, with the last error shown, instead of every message hammering a dead host.

From an Edge to the Internet, the organization's own mail (``Message.from_organization``) is
DKIM-signed (``dkim_sign``) per connection, after ``encoding.plan``: the bytes signed are the
bytes sent. Between nodes of the organization it carries the relay's headers (``relay``).
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import aiosmtplib
import uvloop

from mailyard import headers, pki, redisconn, registry
from mailyard.errors import DeliveryError, PermanentDeliveryError, SiteError, TransientDeliveryError
from mailyard.hub import address_rewrite, dkim_sign, encoding, mx
from mailyard.hub.node import Node
from mailyard.hub.outcomes import Batch, Outcome, defer_batch, settle
from mailyard.hub.records import DeliveryType, Item, Message
from mailyard.hub.redis_queues import RedisQueues
from mailyard.hub.relay import INTERNAL_HEADER, ORIGIN_HEADER
from mailyard.hub.send_transaction import transaction
from mailyard.org import AddressRewrite, DkimKey, SendConnector
from mailyard.tls import opportunistic_client_context
from mailyard.tracking import Event

log = logging.getLogger("mailyard.hub.send")

CONNECT_TIMEOUT = 30.0  # at most; shorter if the inactivity timeout is
ORG_TLS = "hub to hub links are TLS verified against the organization's CA"


@dataclass
class Destination:
    """Where and how to connect for one batch."""

    targets: list[mx.Target]
    port: int
    require_tls: bool = False
    username: str = ""
    password: str = ""
    org_origin: bool = False  # add X-Mailyard-Origin (hub-to-hub relay within the organization)
    peer: pki.Identity | None = None  # a node of the organization: TLS verified against its CA, to this identity
    tls_context: ssl.SSLContext | None = None  # with ``peer``: this hub's client context (Node.relay_tls)
    tls_auth_level: str | None = None  # with require_tls: EncryptionOnly, CertificateValidation, DomainValidation
    tls_domain: str | None = None  # with DomainValidation: the name the certificate must carry
    peers: dict[str, pki.Identity] = field(default_factory=dict)  # per target host (Edges): as ``peer``
    dkim: dict[str, DkimKey] = field(default_factory=dict)  # an Edge to the Internet: sign with these
    rewrites: list[AddressRewrite] = field(default_factory=list)  # an Edge to the Internet: address_rewrite

    def peer_for(self, target: mx.Target) -> pki.Identity | None:
        return self.peers.get(target.host, self.peer)

    @property
    def session_key(self) -> str:
        """What a cached connection must have been opened for, besides the address."""
        if self.peers:
            return "|".join(sorted(p.dns_name for p in self.peers.values()))
        return self.peer.dns_name if self.peer else f"{self.username}|{self.tls_auth_level}|{self.tls_domain}"


@dataclass
class Job:
    item: Item
    sender: str
    recipients: list[str]
    body: bytes
    smtputf8: bool = False  # sent with SMTPUTF8 (records.Message.smtputf8)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    dkim: dict[str, DkimKey] = field(default_factory=dict)  # sign with these what goes on the wire (dkim_sign)


def _connector(node: Node, name: str) -> SendConnector | None:
    return next((c for c in node.orgs.org.send_connectors if c.name == name), None)


def _host_port(value: str, default: int) -> tuple[str, int]:
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    host, sep, port = value.rpartition(":")
    return (host, int(port)) if sep and port.isdigit() and host.count(":") == 0 else (value, default)


def destination_of(node: Node, batch: Batch) -> Destination:
    """Targets of the batch's next hop. Raises Permanent/TransientDeliveryError."""
    settings = node.settings
    if batch.delivery_type == DeliveryType.REMOTE_SITE.value:
        return _remote_site_destination(node, batch.next_hop)
    name = batch.connector
    conn = _connector(node, name)
    if conn is None or not conn.enabled:
        raise TransientDeliveryError(451, "4.4.9", f"send connector {name!r} is missing or disabled")
    if conn.source_edges and not node.is_edge:
        return _edge_destination(node, conn)
    if node.is_edge and conn.smart_hosts == ["--"]:
        return _subscribed_hubs_destination(node)
    role = node.orgs.org.edge
    signing = {k.domain: k for k in role.dkim if k.active} if role is not None else {}
    resolver = mx.resolver_for(settings.dns_servers)
    if batch.delivery_type == DeliveryType.DNS.value:
        targets = mx.resolve(resolver, batch.next_hop)
    else:
        targets = []
        for text in conn.smart_hosts:
            host, port = _host_port(text, conn.port)
            try:
                found = mx.addresses(resolver, host) if not _is_ip(host) else [host]
            except TransientDeliveryError:
                found = []
            targets += [mx.Target(host, a, port=port) for a in found]
        if not targets:
            raise TransientDeliveryError(451, "4.4.0", f"no address for the smart hosts of {conn.name}")
    return Destination(targets, conn.port, conn.require_tls, conn.smart_host_username, conn.smart_host_password,
                       tls_auth_level=conn.tls_auth_level, tls_domain=conn.tls_domain, dkim=signing,
                       rewrites=list(node.orgs.org.address_rewrites) if role is not None else [])


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _relay_tls(node: Node) -> ssl.SSLContext:
    try:
        return node.relay_tls()
    except SiteError as exc:
        raise TransientDeliveryError(451, "4.7.5", f"{exc}: nothing sent ({ORG_TLS})") from None


def _edge_destination(node: Node, conn: SendConnector) -> Destination:
    """A connector whose source is one or more Edge subscriptions, from a hub of its site: the
    Edges' receive connectors (shuffled), each to prove itself with the certificate the
    organization's CA issued at its subscription; this hub presents its site's."""
    org = node.orgs.org
    targets, peers = [], {}
    for sub in org.edge_subscriptions:
        if sub.name in conn.source_edges:
            host, port = _host_port(sub.smtp, 25)
            targets.append(mx.Target(sub.name, host, port=port))
            peers[sub.name] = pki.Identity.edge(sub.name)
    if not targets:
        raise TransientDeliveryError(451, "4.4.1", f"no Edge subscription is a source of {conn.name}")
    random.shuffle(targets)
    return Destination(targets, 25, require_tls=True, org_origin=True, peers=peers, tls_context=_relay_tls(node))


def _subscribed_hubs_destination(node: Node) -> Destination:
    """On an Edge, ``EdgeSync - Inbound to <Site>`` (smart hosts ``--``): the hubs of the site
    it is subscribed to, as EdgeSync listed them (shuffled), each to prove itself with the
    site's certificate; the Edge presents its own."""
    role = node.orgs.org.edge
    assert role is not None
    targets = []
    for i, address in enumerate(role.hubs):
        host, port = _host_port(address, 25)
        targets.append(mx.Target(f"hub {i + 1} of {role.site}", host, port=port))
    if not targets:
        raise TransientDeliveryError(451, "4.4.1", f"EdgeSync has listed no live hub of site {role.site}")
    random.shuffle(targets)
    return Destination(targets, 25, require_tls=True, org_origin=True, peer=pki.Identity.hub(role.site),
                       tls_context=_relay_tls(node))


def _remote_site_destination(node: Node, site: str) -> Destination:
    """The live hubs of ``site`` (shuffled: the load spreads), at a receive connector that
    takes Exchange servers by their certificate; this hub presents its own (``Node.relay_tls``)
    and expects the certificate of ``site``'s hubs."""
    org = node.orgs.org
    takes_servers = {c.name for c in org.receive_connectors
                     if c.enabled and "ExchangeServers" in c.permission_groups and "ExchangeServer" in c.auth_mechanisms
                     and (not c.sites or site in c.sites)}
    targets = []
    for hub in registry.hubs(node.r):
        if hub.site != site or not hub.alive(org.transport.hub_heartbeat_timeout):
            continue
        for name, address in hub.endpoints.items():
            if name in takes_servers:
                host, port = _host_port(address, 25)
                targets.append(mx.Target(hub.name, host, port=port))
                break
    if not targets:
        raise TransientDeliveryError(451, "4.4.1", f"no hub of site {site} is reachable over SMTP")
    random.shuffle(targets)
    try:
        tls_context = node.relay_tls()
    except SiteError as exc:
        raise TransientDeliveryError(451, "4.7.5", f"{exc}: nothing sent ({ORG_TLS})") from None
    return Destination(targets, 25, require_tls=True, org_origin=True, peer=pki.Identity.hub(site),
                       tls_context=tls_context)


class ConnectionCache:
    """This process's SMTP connections kept open between batches, as Postfix's scache keeps
    them: a busy next hop is not connected to again (TCP, greeting, EHLO, STARTTLS, AUTH)
    for every batch. One is reused only after an RSET proves it alive, for at most
    ``IDLE_S`` seconds and ``MAX_MESSAGES`` messages, and by this process's one event loop
    (a connection belongs to the loop that opened it)."""

    IDLE_S = 30.0
    MAX_MESSAGES = 500

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()  # as the receive listener's (receive_listener.serve)
        self._idle: dict[tuple[str, int, str], list[tuple[aiosmtplib.SMTP, float, int]]] = {}

    async def take(self, key: tuple[str, int, str], timeout: float) -> tuple[aiosmtplib.SMTP, int] | None:
        now = time.monotonic()
        while self._idle.get(key):
            smtp, since, sent = self._idle[key].pop()
            if now - since > self.IDLE_S:
                smtp.close()
                continue
            try:
                await smtp.rset(timeout=min(timeout, 10.0))
                return smtp, sent
            except (aiosmtplib.SMTPException, OSError):
                smtp.close()
        return None

    def give_back(self, key: tuple[str, int, str], smtp: aiosmtplib.SMTP, sent: int) -> None:
        if sent >= self.MAX_MESSAGES or not smtp.is_connected:
            smtp.close()
            return
        self._idle.setdefault(key, []).append((smtp, time.monotonic(), sent))


_caches: dict[int, ConnectionCache] = {}


def connection_cache() -> ConnectionCache:
    """The cache of this process (prefork children each get their own, never the parent's)."""
    pid = os.getpid()
    if pid not in _caches:
        _caches.clear()
        _caches[pid] = ConnectionCache()
    return _caches[pid]


async def _open(target: mx.Target, port: int, dest: Destination, *, helo: str, timeout: float) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(hostname=target.address, port=port, local_hostname=helo,
                           timeout=timeout, start_tls=False, use_tls=False)
    try:
        await smtp.connect(timeout=min(CONNECT_TIMEOUT, timeout))
        await smtp.ehlo()
        if (peer := dest.peer_for(target)) is not None:
            await _org_tls(smtp, target, peer, dest.tls_context)
            await smtp.ehlo()
        elif smtp.supports_extension("starttls"):
            await _starttls(smtp, target, dest)
            await smtp.ehlo()
        elif dest.require_tls:
            raise TransientDeliveryError(451, "4.7.5", f"{target.host} does not offer STARTTLS (require_tls)")
        if dest.username:
            if smtp.get_transport_info("sslcontext") is None:
                raise TransientDeliveryError(451, "4.7.5", f"{target.host} does not offer STARTTLS: the smart "
                                                           "host's password is never sent in clear")
            await smtp.login(dest.username, dest.password)
    except BaseException:
        smtp.close()
        raise
    return smtp


async def _starttls(smtp: aiosmtplib.SMTP, target: mx.Target, dest: Destination) -> None:
    """STARTTLS to a host outside the organization, checked as the connector's tls_auth_level
    says (against the system's CA store); without require_tls, opportunistic (RFC 7435)."""
    level = dest.tls_auth_level if dest.require_tls else None
    if level in (None, "EncryptionOnly"):
        await smtp.starttls(tls_context=opportunistic_client_context())
        return
    ctx = ssl.create_default_context()
    name = dest.tls_domain or target.host
    if level == "CertificateValidation":
        ctx.check_hostname = False  # a valid chain, for whatever name
    try:
        await smtp.starttls(server_hostname=name, tls_context=ctx)
    except ssl.SSLCertVerificationError as exc:
        what = f"a valid certificate for {name}" if level == "DomainValidation" else "a valid certificate"
        raise TransientDeliveryError(451, "4.7.5", f"{target.host} [{target.address}] did not present {what} "
                                                   f"({exc.verify_message}; tls_auth_level {level})") from None
    except ssl.SSLError as exc:
        raise TransientDeliveryError(451, "4.7.5", f"no TLS with {target.host} ({exc.reason or exc})") from None


async def _org_tls(smtp: aiosmtplib.SMTP, target: mx.Target, peer: pki.Identity,
                   tls_context: ssl.SSLContext | None) -> None:
    """STARTTLS to a node of the organization, verified before anything else is sent: the
    chain against the organization's CA only (the context trusts nothing else), then the name
    the certificate carries against ``peer`` (``pki.matches``). Raises TransientDeliveryError
    (4.7.5) saying why not."""
    where = f"{target.host} [{target.address}]"
    if tls_context is None:
        raise TransientDeliveryError(451, "4.7.5", f"this hub has no certificate to present to {where}: "
                                                   f"nothing sent ({ORG_TLS})")
    if not smtp.supports_extension("starttls"):
        raise TransientDeliveryError(451, "4.7.5", f"{where} does not offer STARTTLS: nothing sent ({ORG_TLS})")
    try:
        await smtp.starttls(server_hostname=peer.dns_name, tls_context=tls_context)
    except ssl.SSLCertVerificationError as exc:
        raise TransientDeliveryError(
            451, "4.7.5", f"the certificate of {where} is not issued by the organization's CA "
                          f"({exc.verify_message}): nothing sent ({ORG_TLS})") from None
    except ssl.SSLError as exc:
        raise TransientDeliveryError(
            451, "4.7.5", f"no TLS with {where} ({exc.reason or exc}): nothing sent ({ORG_TLS})") from None
    except aiosmtplib.SMTPResponseException as exc:
        raise TransientDeliveryError(
            451, "4.7.5", f"{where} refused STARTTLS ({exc.code} {exc.message}): nothing sent ({ORG_TLS})") from None
    # The context verified the chain (and nothing but the chain: Node.relay_tls); the name is
    # checked here, before anything is sent, so that the error can say whose certificate it was.
    found = pki.peer_identity(smtp.get_transport_info("ssl_object"))
    if not pki.matches(found, peer):
        names = found.dns_name if found else "no node of the organization"
        raise TransientDeliveryError(
            451, "4.7.5", f"the certificate of {where} names {names}, not {peer.dns_name} ({peer}): "
                          f"nothing sent ({ORG_TLS})")


async def transfer(dest: Destination, jobs: list[Job], *, helo: str, timeout: float,
                   cache: ConnectionCache | None = None) -> str:
    """Deliver ``jobs`` over one connection to the first target that answers (a cached one
    when there is one); fill in each job's outcomes and return the host used. Raises
    TransientDeliveryError if none answers. ``timeout`` bounds every wait for the peer
    (connect, each reply, DATA)."""
    last_error = "no target"
    refused: TransientDeliveryError | None = None  # the last target that failed the organization's TLS
    for target in dest.targets:
        port = target.port or dest.port
        key = (target.address, port, dest.session_key)
        reused = await cache.take(key, timeout) if cache else None
        if reused:
            smtp, sent = reused
        else:
            try:
                smtp, sent = await _open(target, port, dest, helo=helo, timeout=timeout), 0
            except (aiosmtplib.SMTPException, OSError, TransientDeliveryError) as exc:
                if isinstance(exc, TransientDeliveryError) and exc.status.startswith("4.7."):
                    refused = exc
                last_error = f"{target.host} [{target.address}]: {_describe(exc)}"
                log.info("cannot deliver to %s: %s", target.host, last_error)
                continue
        healthy = await _send_jobs(smtp, jobs, timeout, target.host)
        if cache is not None and healthy:
            cache.give_back(key, smtp, sent + len(jobs))
        else:
            try:
                await smtp.quit()
            except (aiosmtplib.SMTPException, OSError):
                smtp.close()
        return f"{target.host} [{target.address}]"
    if refused is not None:  # the reason that matters: no link we could trust (4.7.x, not 4.4.0)
        raise TransientDeliveryError(refused.code, refused.status, refused.text)
    raise TransientDeliveryError(
        451, "4.4.0",
        f"Primary target IP address responded with: \"{last_error}.\" Attempted failover to "
        "alternate host, but that did not succeed.",
    )


async def _send_jobs(smtp: aiosmtplib.SMTP, jobs: list[Job], timeout: float, host: str) -> bool:
    """One transaction per job on an open connection to ``host`` (``send_transaction``:
    pipelined where the peer offers it), each as the peer's extensions allow
    (``encoding.plan``: SMTPUTF8, 8BITMIME); False if the connection was lost. A lost
    connection leaves the jobs not yet answered without outcome (they are retried)."""
    open_transaction = False  # RSET only after a transaction that did not end with DATA's reply
    for job in jobs:
        how = encoding.plan(job.sender, job.recipients, job.body, smtputf8=job.smtputf8,
                            offers=smtp.supports_extension, host=host)
        job.outcomes.update(how.refused)
        if not how.recipients:
            continue
        if job.dkim:
            _sign(how, job.dkim)
        try:
            done = await transaction(smtp, how.sender, list(how.recipients.values()), how.body, how.options,
                                     rset=open_transaction, timeout=timeout, encoding=how.encoding)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            log.warning("connection lost during a delivery: %s", _describe(exc))
            return False
        open_transaction = done.open
        recipient_of = {sent_as: rcpt for rcpt, sent_as in how.recipients.items()}
        for sent_as, reply in done.replies.items():
            job.outcomes[recipient_of[sent_as]] = Outcome(reply.code, _status_of(reply.message, reply.code),
                                                          reply.message)
    return True


def _sign(how: encoding.Transfer, keys: dict[str, DkimKey]) -> None:
    """Sign the body as it goes to this peer (after ``encoding.plan``'s 7-bit downgrade, the
    bytes the receiver verifies), and make SIZE count the signature."""
    signed = dkim_sign.sign(how.body, keys)
    if signed is how.body:
        return
    how.body = signed
    how.options = [f"SIZE={len(signed)}" if o.startswith("SIZE=") else o for o in how.options]


def job_of(dest: Destination, item: Item, msg: Message, body: bytes) -> Job:
    """What ``deliver`` sends of one item: between nodes of the organization the relay's
    headers added (``relay``); to the Internet from an Edge, if the message is the
    organization's own, its addresses rewritten (``address_rewrite``) and the keys to sign it
    with (Internet mail going out again is neither)."""
    sender = msg.sender
    if dest.org_origin:
        lines = [f"{ORIGIN_HEADER}: {msg.id}"]
        if msg.from_organization:
            lines.append(f"{INTERNAL_HEADER}: 1")
        body = headers.prepend(body, *lines)
    elif msg.from_organization:
        sender, body = address_rewrite.outbound_message(dest.rewrites, sender, body)
    signing = dest.dkim if dest.dkim and not dest.org_origin and msg.from_organization else {}
    return Job(item, sender, [r.address for r in item.recipients], body, msg.smtputf8, dkim=signing)


def _status_of(message: str, code: int) -> str:
    first = message.split(" ", 1)[0]
    if first.count(".") == 2 and first[0] in "245" and first.replace(".", "").isdigit():
        return first
    return f"{str(code)[0]}.0.0"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message}"
    if isinstance(exc, DeliveryError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


@contextmanager
def keep_leases(node: Node, batch: Batch) -> Iterator[None]:
    """Renew the batch's leases while a long SMTP session runs (a slow peer may take the whole
    inactivity timeout per command, much longer than a lease)."""
    lease_ms = int(node.settings.lease_time * 1000)
    stop = threading.Event()

    def renew_loop() -> None:
        queues = None
        held = len(batch.items)
        while not stop.wait(max(0.5, lease_ms / 3000)):
            # its own client (a thread), made only if needed
            queues = queues or RedisQueues.reader(redisconn.connect(node.redis_url))
            try:
                renewed = queues.renew(batch.queue, batch.token, [i.id for i in batch.items], lease_ms)
            except Exception as exc:  # the sweeper may reclaim; the guards keep that safe
                log.warning("could not renew leases on %s: %s", batch.queue, exc)
                continue
            if len(renewed) < held:  # (their outcomes will not apply: the lease guard)
                log.warning("%s: lost the leases of %d of %d items", batch.queue, len(batch.items) - len(renewed),
                            len(batch.items))
                held = len(renewed)

    thread = threading.Thread(target=renew_loop, name="lease-renewal", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def deliver(node: Node, batch: Batch) -> None:
    """The stage of DnsConnectorDelivery, SmartHostConnectorDelivery and
    SmtpRelayToRemoteAdSite queues."""
    try:
        dest = destination_of(node, batch)
    except PermanentDeliveryError as exc:
        outcome = Outcome.of(exc)
        settle(node, batch, {i.id: {r.address: outcome for r in i.recipients} for i in batch.items},
               event=Event.SEND, source="SMTP")
        return
    except TransientDeliveryError as exc:
        defer_batch(node, batch, exc, source="SMTP")
        return
    bodies = node.queues.bodies([i.msg for i in batch.items])
    jobs = []
    for item in batch.items:
        msg = batch.messages.get(item.msg)
        if msg is None or item.msg not in bodies:
            continue
        jobs.append(job_of(dest, item, msg, bodies[item.msg]))
    node.crash_point("send.before_connect")
    try:
        cache = connection_cache()
        with keep_leases(node, batch):
            remote = cache.loop.run_until_complete(transfer(dest, jobs, helo=node.fqdn, cache=cache,
                                                            timeout=node.settings.smtp_inactivity_timeout))
    except TransientDeliveryError as exc:
        defer_batch(node, batch, exc, source="SMTP")
        return
    node.crash_point("send.after_data")
    settle(node, batch, {j.item.id: j.outcomes for j in jobs}, event=Event.SEND, source="SMTP", remote=remote)

