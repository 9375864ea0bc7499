"""Receive connectors: SMTP in, as an Exchange 2010 hub accepts it.

Each connection is matched to the connector of its listening address whose remote IP range
matches the client most specifically. The connector decides:

- who may submit (permission groups): AnonymousUsers, ExchangeUsers (a mailbox that
  logged on), ExchangeServers (another hub, logged on with the site's server token),
  Partners; a client with none of them gets ``530 5.7.1 Client was not authenticated``;
- who may relay: ExchangeUsers and ExchangeServers; anyone else may only send to the
  accepted domains (``550 5.7.1 Unable to relay``), and only to recipients that exist
  (``550 5.1.1 User unknown``);
- limits: message size (advertised with SIZE, ``552 5.3.4``), recipients per message
  (``452 4.5.3``), hop count (``554 5.4.6``), connections per source, failed logons;
- authentication: STARTTLS (Tls), AUTH PLAIN/LOGIN (BasicAuth), and whether AUTH needs TLS
  first (BasicAuthRequireTLS); ExternalAuthoritative trusts every client the connector's remote
  IP ranges admit as an Exchange server without a logon (the link is secured by other means).

``250`` after DATA is sent only once the message is durable in the Submission queue.
Connectors are read from the organization for every new connection, so ``mailyard org
apply`` changes them without a restart.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import ipaddress
import logging
import re
import ssl
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate, make_msgid
from typing import Any

import redis.asyncio
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, TLSSetupException, syntax

from mailyard import headers, keys
from mailyard.directory import Directory
from mailyard.hub import replies
from mailyard.hub.queues import Message, item_ids, new_message_id
from mailyard.hub.relay import ORG_HEADERS, ORIGIN_HEADER, SERVER_LOGIN_PREFIX
from mailyard.hub.smtp_data import read_data
from mailyard.hub.submit import submission_txn
from mailyard.org import ReceiveConnector, normalize_address, parse_ip_range
from mailyard.tracking import Event, Record
from mailyard.txn import GroupCommit, Kick

log = logging.getLogger("mailyard.hub.receive")

# A line of this many bytes without CRLF is closed on (RFC 5321 allows 1000). aiosmtpd refuses
# a long line only when it ends, and in DATA it keeps every piece of it until then: without a
# cap, one client sending no line break would make the process buffer without bound.
MAX_UNBROKEN_LINE = 64 * 1024
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
SIMPLE_PATH = re.compile(  # <dot-atom@domain> [SP params]: the path nearly every client sends
    rf"[ \t]*<(?P<local>{_ATOM}(?:\.{_ATOM})*)@(?P<domain>{_LABEL}(?:\.{_LABEL})*)>(?:[ \t]+(?P<rest>.*))?\Z", re.ASCII)

RELAY_GROUPS = frozenset({"ExchangeUsers", "ExchangeServers"})
ANY_SENDER_GROUPS = frozenset({"AnonymousUsers", "ExchangeServers", "Partners"})


@dataclass
class Identity:
    """Who logged on: a mailbox (ExchangeUsers) or another hub (ExchangeServers)."""

    kind: str  # "user" or "server"
    name: str  # the mailbox's primary address, or the hub's name
    addresses: frozenset[str] = frozenset()


@dataclass
class SessionState:
    connector: ReceiveConnector
    client_ip: str
    logon_failures: int = 0
    counted: bool = False
    implicit: Identity | None = None  # ExternalAuthoritative: a server without a logon

    def groups(self, identity: Identity | None) -> set[str]:
        granted = set(self.connector.permission_groups)
        have = {"AnonymousUsers", "Partners"} & granted
        if identity is not None and identity.kind == "user":
            have |= {"ExchangeUsers"} & granted
        if identity is not None and identity.kind == "server":
            have |= {"ExchangeServers"} & granted
        return have


def select_connector(connectors: list[ReceiveConnector], ip: str) -> ReceiveConnector | None:
    """The connector whose remote IP range matches ``ip`` most specifically."""
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
            if lo.version != addr.version or not lo <= addr <= hi:
                continue
            size = int(hi) - int(lo)
            if best is None or size < best[0]:
                best = (size, conn)
    return best[1] if best else None


@dataclass
class ReceiveContext:
    """What every session of one hub's receive connectors shares."""

    hub: str
    site: str
    fqdn: str
    r: redis.asyncio.Redis
    directory: Callable[[], Directory]
    kick: Callable[[list[Kick]], None]
    tls: ssl.SSLContext | None = None
    per_source: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sessions: Counter[str] = field(default_factory=Counter)
    pressure: Callable[[str], str | None] = lambda origin: None  # back pressure: a refusal or None
    commits: GroupCommit = field(init=False)

    def __post_init__(self) -> None:
        self.commits = GroupCommit(self.r)

    def count_session(self, connector: str) -> None:
        """One more SMTP session (for /metrics); counted here, written out once a second."""
        self.sessions[connector] += 1

    async def flush_counts(self) -> None:
        if not self.sessions:
            return
        counts, self.sessions = self.sessions, Counter()
        pipe = self.r.pipeline(transaction=False)
        for connector, n in counts.items():
            pipe.hincrby(keys.STATS, f"SESSION|{self.hub}\\{connector}", n)
        await pipe.execute()

    def connectors_for(self, binding: str) -> list[ReceiveConnector]:
        org = self.directory().org
        return [c for c in org.receive_connectors
                if binding in c.bindings and (not c.sites or self.site in c.sites)]


@functools.cache
def _members(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The member names aiosmtpd looks for. Its __init__ scans dir() of the session and of the
    handler (and getattr's every member) on every connection: offering only these names makes
    a new session several times cheaper (measured: about 0.4 ms less CPU per connection)."""
    return [n for n in dir(cls) if n.startswith(prefixes)]


class Connection(SMTP):
    """One SMTP session, configured by the connector that matches the client."""

    def __dir__(self) -> list[str]:
        return _members(type(self), ("smtp_", "auth_"))

    def __init__(self, handler: Receiver, ctx: ReceiveContext, binding: str, **kwargs: Any) -> None:
        super().__init__(
            handler, hostname=ctx.fqdn, ident="Mailyard ESMTP MAIL service ready", tls_context=ctx.tls,
            authenticator=handler.authenticate, auth_require_tls=True, enable_SMTPUTF8=True,
            timeout=300, **kwargs,
        )
        self.ctx = ctx
        self.binding = binding
        self.state: SessionState | None = None
        self._pending_lines: list[str] = []
        self._all_auth_methods = dict(self._auth_methods)
        self._unbroken = 0  # bytes received since the last CRLF
        self._after_cr = False

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # Nearly every address is a plain <dot-atom@domain>: a regular expression reads that
        # in microseconds, where the standard library's RFC 5322 parser takes a quarter of a
        # millisecond. Everything else (quoted local parts, IP literals, source routes) still
        # goes to the parser.
        simple = SIMPLE_PATH.match(arg)
        if simple and not (self.local_part_limit and len(simple["local"]) > self.local_part_limit):
            return f"{simple['local']}@{simple['domain']}", simple["rest"] or ""
        # The standard library's address parser raises IndexError on some malformed input
        # (an unclosed "<"): that is a malformed address, answered 501 5.1.3, not a crash.
        try:
            return super()._getaddr(arg)
        except (IndexError, ValueError):
            return None, None

    def _configure(self, conn: ReceiveConnector, ip: str) -> None:
        self.state = SessionState(conn, ip)
        self.data_size_limit = conn.max_message_size
        mechanisms = set(conn.auth_mechanisms)
        if "ExternalAuthoritative" in mechanisms:
            self.state.implicit = Identity("server", f"[{ip}]")
        self.tls_context = self.ctx.tls if "Tls" in mechanisms else None
        self._auth_require_tls = "BasicAuthRequireTLS" in mechanisms
        logons = mechanisms & {"BasicAuth", "BasicAuthRequireTLS", "ExchangeServer"}
        allowed = {"PLAIN", "LOGIN"} if logons else set()
        self._auth_methods = {k: v for k, v in self._all_auth_methods.items() if k in allowed}
        if conn.banner:
            self.__ident__ = conn.banner.removeprefix("220 ").split(" ", 1)[-1]
        if conn.fqdn:
            self.hostname = conn.fqdn

    async def _handle_client(self) -> None:
        peer = self.session.peer if self.session else None
        ip = peer[0] if isinstance(peer, tuple) else "0.0.0.0"
        conn = select_connector(self.ctx.connectors_for(self.binding), ip)
        if conn is None:
            await self.push(replies.NO_CONNECTOR)
            self._close()
            return
        self._configure(conn, ip)
        assert self.state is not None
        if self.ctx.per_source[ip] >= conn.max_inbound_connection_per_source:
            await self.push(replies.TOO_MANY_CONNECTIONS)
            self._close()
            return
        self.ctx.per_source[ip] += 1
        self.state.counted = True
        self.ctx.count_session(conn.name)
        await super()._handle_client()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._unbroken > MAX_UNBROKEN_LINE:
            return  # closing: read nothing more
        end = data.rfind(b"\r\n")
        if end >= 0:
            self._unbroken = len(data) - end - 2
        elif self._after_cr and data.startswith(b"\n"):
            self._unbroken = len(data) - 1
        else:
            self._unbroken += len(data)
        self._after_cr = data.endswith(b"\r")
        if self._unbroken > MAX_UNBROKEN_LINE:
            log.warning("closing the connection of %s: a line longer than %d bytes",
                        self.state.client_ip if self.state else "?", MAX_UNBROKEN_LINE)
            if isinstance(self.transport, asyncio.WriteTransport) and not self.transport.is_closing():
                self.transport.write(b"500 5.5.2 Line too long\r\n")
            self._close()
            return
        super().data_received(data)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd's checks, then the DATA section read in chunks (smtp_data.py says why).
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            data = await read_data(self._reader, size_limit=self.data_size_limit, line_limit=self.line_length_limit)
        except asyncio.CancelledError:  # the connection was lost during DATA
            self._writer.close()
            raise
        if data.content is None:
            self._set_post_data_state()
            await self.push(data.error or replies.STORAGE_FAILED)
            return
        self.envelope.content = self.envelope.original_content = data.content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        # aiosmtpd would start a second TLS layer inside the first, which asyncio cannot run.
        if self._tls_protocol is not None:
            await self.push(replies.TLS_ACTIVE)
            return
        try:
            await super().smtp_STARTTLS(arg)
        except TLSSetupException as exc:
            # The handshake error and the frames of its traceback refer to each other (and to
            # the TLS layer): clear the frames so a failed handshake is freed at once.
            for error in (exc, exc.__cause__):
                if error is not None:
                    traceback.clear_frames(error.__traceback__)
            raise

    def connection_lost(self, error: Exception | None) -> None:
        if self.state is not None and self.state.counted:
            self.state.counted = False
            ip = self.state.client_ip
            self.ctx.per_source[ip] -= 1
            if self.ctx.per_source[ip] <= 0:
                self.ctx.per_source.pop(ip, None)
        # Why the connection ended matters to no one (the session is cancelled either way), and
        # an exception kept in the stream reader holds its traceback's frames, the TLS layer with them.
        super().connection_lost(None)
        # A session is a reference cycle that only the cyclic GC frees; after STARTTLS it holds
        # the TLS layer (OpenSSL state and a 256 KB buffer per connection). Let it go now: a
        # flood of TLS sessions otherwise inflates the process by tens of MB between collections.
        self._tls_protocol = None
        self._original_transport = None

    async def push(self, status: str | bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            # The session is over (QUIT, 421, too many unknown commands, a line too long), but
            # aiosmtpd goes on with commands the client pipelined: end the session here rather
            # than act on them (and write to a closed TLS transport, which raises).
            if self._handler_coroutine is not None:
                self._handler_coroutine.cancel()
            await asyncio.sleep(0)
            return
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        text = replies.enhance(text)
        if text.startswith("250-"):
            self._pending_lines.append(text)  # an EHLO line: written with the last one, in one send
            return
        if self._pending_lines:
            text = "\r\n".join([*self._pending_lines, text])
            self._pending_lines.clear()
        await super().push(text)
        if text.startswith("535") and self.state is not None:
            self.state.logon_failures += 1
            limit = self.state.connector.max_logon_failures
            if limit and self.state.logon_failures >= limit:
                await super().push(replies.TOO_MANY_LOGON_FAILURES)
                self._close()


class Receiver:
    """The aiosmtpd handler: MAIL, RCPT and DATA decisions, and the durable enqueue."""

    def __init__(self, ctx: ReceiveContext) -> None:
        self.ctx = ctx

    def __dir__(self) -> list[str]:
        return _members(type(self), ("handle_", "auth_"))

    # region: authentication

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                     auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace").strip()
        password = auth_data.password
        directory = self.ctx.directory()
        conn = server.state.connector if isinstance(server, Connection) and server.state else None
        mechanisms = set(conn.auth_mechanisms) if conn else set()
        if login.lower().startswith(SERVER_LOGIN_PREFIX):
            token = directory.org.transport.server_token.encode()
            if token and "ExchangeServer" in mechanisms and hmac.compare_digest(password, token):
                hub = login.partition("/")[2] or "hub"
                return AuthResult(success=True, auth_data=Identity("server", hub))
            return AuthResult(success=False, handled=False)
        if not mechanisms & {"BasicAuth", "BasicAuthRequireTLS"}:
            return AuthResult(success=False, handled=False)
        entry = directory.mailbox_entry(login)
        expected = directory.passwords.get(entry.address, "") if entry else ""
        if entry and expected and hmac.compare_digest(password, expected.encode()):
            aliases = {a for m in directory.org.mailboxes if m.address == entry.address for a in m.aliases}
            return AuthResult(success=True, auth_data=Identity("user", entry.address,
                                                               frozenset({entry.address, *aliases})))
        return AuthResult(success=False, handled=False)

    # endregion

    @staticmethod
    def _identity(server: Connection, session: Session) -> Identity | None:
        data = session.auth_data
        if session.authenticated and isinstance(data, Identity):
            return data
        return server.state.implicit if server.state else None

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        last = responses.pop()  # "250 HELP"
        responses = [r for r in responses if r.rstrip() != "250-AUTH"]  # AUTH with no mechanism
        responses.append("250-ENHANCEDSTATUSCODES")
        responses.append(last)
        return responses

    async def handle_MAIL(self, server: Connection, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        state = server.state
        assert state is not None
        identity = self._identity(server, session)
        groups = state.groups(identity)
        if not groups:
            return replies.NOT_AUTHENTICATED
        sender = ""
        if address != "<>":
            try:
                sender = normalize_address(address)
            except ValueError:
                return replies.INVALID_SENDER
        if identity and identity.kind == "user" and not groups & ANY_SENDER_GROUPS and sender and (
            sender not in identity.addresses
        ):
            return replies.SEND_AS_DENIED
        own = identity is not None or (bool(sender) and self.ctx.directory().is_accepted(sender))
        if refusal := self.ctx.pressure("internal" if own else "external"):
            return refusal
        if identity is not None and identity.kind == "server":
            # ms-Exch-Bypass-Message-Size-Limit: a hub relaying within the organization carries
            # a message the first hub accepted, plus its own headers; the limits were applied there.
            server.data_size_limit = None
        envelope.mail_from = sender or "<>"  # aiosmtpd needs it non-empty to see a MAIL happened
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK

    async def handle_RCPT(self, server: Connection, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        state = server.state
        assert state is not None
        if len(envelope.rcpt_tos) >= state.connector.max_recipients_per_message:
            return replies.TOO_MANY_RECIPIENTS
        try:
            rcpt = normalize_address(address)
        except ValueError:
            return replies.INVALID_RECIPIENT
        directory = self.ctx.directory()
        groups = state.groups(self._identity(server, session))
        if directory.is_accepted(rcpt):
            if directory.lookup(rcpt) is None:
                return replies.USER_UNKNOWN
        elif not groups & RELAY_GROUPS:
            return replies.UNABLE_TO_RELAY
        if rcpt not in envelope.rcpt_tos:
            envelope.rcpt_tos.append(rcpt)
            envelope.rcpt_options.extend(rcpt_options)
        return replies.RECIPIENT_OK

    async def handle_DATA(self, server: Connection, session: Session, envelope: Envelope) -> str:
        state = server.state
        assert state is not None
        raw = envelope.original_content or b""
        if headers.hop_count(raw) >= state.connector.max_hop_count:
            return replies.HOP_COUNT
        identity = self._identity(server, session)
        trusted = identity is not None and identity.kind == "server"
        head = headers.parse(raw)
        origin = str(head.get(ORIGIN_HEADER, "")).strip() if trusted else ""
        raw = headers.strip(raw, *ORG_HEADERS)
        now_s = time.time()
        now = int(now_s * 1000)
        directory = self.ctx.directory()
        settings = directory.org.transport
        msg = Message(
            id=new_message_id(), sender="" if envelope.mail_from == "<>" else envelope.mail_from or "",
            received=now, expires=now + int(settings.message_expiration_timeout * 1000),
            source="SMTP", origin=origin, site=self.ctx.site, hub=self.ctx.hub, client=state.client_ip,
        )
        message_id = str(head.get("Message-ID", "")).strip()
        extra = []
        if not message_id:
            message_id = make_msgid(domain=self.ctx.fqdn)
            extra.append(f"Message-ID: {message_id}")
        msg.message_id = message_id
        msg.subject = str(head.get("Subject", ""))[:500]
        with_ = "ESMTP" + ("S" if session.ssl else "") + ("A" if session.authenticated else "")
        helo = session.host_name or "unknown"
        received = (f"Received: from {helo} ([{state.client_ip}]) by {self.ctx.fqdn} (Mailyard) with {with_}"
                    f" id {msg.id}; {formatdate(now_s, localtime=False)}")
        body = headers.prepend(raw, received, *extra)
        # The size as received, which the limits apply to (Exchange's OriginalSize): our own trace
        # headers must not turn a message accepted at exactly the limit into a 5.3.4 bounce.
        msg.size = len(raw)
        dedup = keys.dedup(f"{origin}:{','.join(sorted(envelope.rcpt_tos))}") if origin else None
        try:
            (item_id,) = await item_ids.take_async(self.ctx.r, 1)
            txn = submission_txn(
                msg, body, list(envelope.rcpt_tos), item_id=item_id, settings=settings, now=now,
                dedup_key=dedup,
                record=Record(Event.RECEIVE, source="SMTP", server=self.ctx.hub, client=state.client_ip,
                              connector=f"{self.ctx.hub}\\{state.connector.name}",
                              message_id=message_id, recipients=list(envelope.rcpt_tos),
                              sender=msg.sender, subject=msg.subject, size=msg.size,
                              context=f"helo={helo}" + (f", origin={origin}" if origin else "")),
            )
            result = await self.ctx.commits.run(txn)
        except Exception as exc:  # Redis down: the client keeps the message and tries again
            log.error("could not store a message from %s: %s", state.client_ip, exc)
            return replies.STORAGE_FAILED
        if not result.ok:
            # guard 1: our own transaction had been applied before a lost reply made the Redis
            # client send it again; guard 2: a relay repeated after a lost reply. Queued once.
            existing = msg.id if result.failed_guard == 1 else (result.value or b"").decode()
            return replies.queued(message_id, existing, self.ctx.hub)
        if result.kicks:
            asyncio.get_running_loop().run_in_executor(None, self.ctx.kick, result.kicks)
        return replies.queued(message_id, msg.id, self.ctx.hub)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # the client's fault: no traceback per bad client
            log.warning("TLS handshake failed: %r", error.__cause__)
            return "454 4.7.0 TLS negotiation failed"  # (aiosmtpd closes the connection instead)
        log.exception("SMTP session error", exc_info=error)
        return "451 4.3.0 Local error in processing"


# aiosmtpd reads handle_EHLO's signature on every connection (to tell its two forms apart):
# a precomputed one saves inspect's work, a tenth of a millisecond per session.
Receiver.handle_EHLO.__signature__ = inspect.signature(Receiver.handle_EHLO)  # type: ignore[attr-defined]
