"""An SMTP sink (aiosmtpd) standing in for Internet mail servers: it stores what it accepts
where a person or a test can look, and misbehaves on request.

Storage: ``<folder>/<recipient domain>/<name>.eml`` holds the message exactly as received
(after dot-unstuffing), once per recipient domain of the transaction; ``<name>.json`` beside
it holds the envelope (``mail_from``, ``rcpt_to``: that domain's recipients, ``rcpt_to_all``,
``peer``, ``received_at``, ``connection``, ``transaction``, ``tls``, ``auth_user``, ``size``).
Both are written to a temporary name and renamed, the JSON first, so a visible ``.eml``
always has its envelope. Names sort in arrival order. :func:`list_messages` reads them back.

Behaviour, all changeable while the sink runs:

- per recipient, at RCPT: :class:`Rule` s, the first whose pattern matches wins, e.g.
  ``Rule("bob@fabrikam.example", "450 4.2.1 Mailbox busy", times=2)`` (fails bob's first
  two attempts, then accepts him) or ``Rule("*@tailspintoys.example", NO_SUCH_USER)``;
- for the whole server: a :class:`Mode` (refuse connections, 421 at the greeting, stall
  before the greeting, hold the greeting until released, drop the connection or stall after
  the final dot), optionally for
  the next N connections or messages only;
- STARTTLS with a given server ``ssl.SSLContext``, AUTH PLAIN/LOGIN with given credentials;
  SMTPUTF8 and 8BITMIME offered or not (a peer of an older kind: ``smtputf8=False``,
  ``eightbitmime=False``), the MAIL FROM parameters kept with each message (``mail_options``).

Counters (:meth:`Sink.stats`): connections, MAIL FROM commands per connection, messages
stored, and the reply given to every RCPT.
"""

from __future__ import annotations

import asyncio
import email.message
import email.policy
import fnmatch
import hmac
import itertools
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mailyard.headers import shown_addresses, shown_text
from mailyard.internet.background import Service

log = logging.getLogger(__name__)

ACCEPT = "250 2.1.5 Recipient OK"
TEMPORARY_FAILURE = "451 4.3.0 Temporary failure, please try again later"
MAILBOX_BUSY = "450 4.2.1 Mailbox busy, try again later"
NO_SUCH_USER = "550 5.1.1 User unknown"
SERVICE_NOT_AVAILABLE = "421 4.3.2 Service not available, closing transmission channel"

_REPLY = re.compile(r"^[245]\d\d( .*)?$")
_DOMAIN = re.compile(r"^[\w\[][\w.\-:\[\]]*$")  # a host name (an IDN too) or address literal, no "/"
_NO_DOMAIN = "_nodomain"  # the folder for a bare recipient such as <postmaster>
_sequence = itertools.count()


@dataclass(frozen=True)
class Rule:
    """How to answer RCPT TO for addresses matching ``pattern``.

    ``pattern`` is an address, ``@domain`` or a shell glob (``*@*.example``), compared
    case-insensitively. ``reply`` is a full SMTP reply line (``"550 5.1.1 User unknown"``).
    ``times``: apply to the first N attempts of each matching address, then accept it;
    ``None``: always.
    """

    pattern: str
    reply: str
    times: int | None = None

    def __post_init__(self) -> None:
        if not _REPLY.match(self.reply):
            raise ValueError(f"{self.reply!r} is not an SMTP reply (2xx, 4xx or 5xx, then text)")
        if self.times is not None and self.times < 0:
            raise ValueError("times must be >= 0")

    def matches(self, address: str) -> bool:
        pattern = self.pattern.lower()
        if pattern.startswith("@"):
            pattern = "*" + pattern
        return fnmatch.fnmatchcase(address.lower(), pattern)


class Mode(StrEnum):
    """What the whole server does."""

    ACCEPT = "accept"  # a well-behaved server
    REFUSE = "refuse"  # not listening: connections are refused
    REJECT_GREETING = "reject-greeting"  # greet with 421, then close
    STALL_GREETING = "stall-greeting"  # accept the connection, never send the greeting
    HOLD_GREETING = "hold-greeting"  # accept the connection, greet only once ``release()`` is called
    DROP_AFTER_DATA = "drop-after-data"  # store the message, close without replying to the final dot
    STALL_AFTER_DATA = "stall-after-data"  # store the message, never reply to the final dot


_PER_CONNECTION = {Mode.REJECT_GREETING, Mode.STALL_GREETING, Mode.HOLD_GREETING}
_PER_MESSAGE = {Mode.DROP_AFTER_DATA, Mode.STALL_AFTER_DATA}


@dataclass(frozen=True)
class SinkStats:
    connections: int  # TCP connections accepted
    transactions: tuple[int, ...]  # MAIL FROM commands accepted, per connection, in connection order
    messages: int  # messages stored (one per transaction, however many domains it went to)
    rcpt_replies: tuple[tuple[str, int], ...]  # (address, reply code) for every RCPT TO, in order

    def attempts(self, address: str) -> int:
        """How many times a client tried RCPT TO ``address``."""
        return sum(1 for a, _ in self.rcpt_replies if a.lower() == address.lower())


class Sink(Service):
    """An SMTP server on ``host:port`` storing what it accepts under ``folder``.

    ``host`` may be any loopback address (127.0.0.2 …), so several sinks can listen on the
    same port as different MX hosts; ``port=0`` picks a free port (see ``port`` once started).
    ``hostname`` is the name in the greeting and EHLO reply. ``tls_context`` offers STARTTLS
    (``require_starttls`` insists on it). ``credentials`` (user → password) offers AUTH PLAIN
    and LOGIN; ``auth_required`` (default: when credentials are given) refuses MAIL before
    AUTH, and ``auth_require_tls`` (default: when a TLS context is given) offers AUTH only
    after STARTTLS. ``pipelining`` offers PIPELINING (aiosmtpd reads pipelined commands in
    order anyway; this only says so in EHLO, as Exchange and Postfix do).
    """

    _thread_name = "smtp-sink"

    def __init__(self, folder: Path | str, host: str = "127.0.0.1", port: int = 0, *,
                 hostname: str = "sink.mailyard.test", rules: Iterable[Rule] = (),
                 mode: Mode | str = Mode.ACCEPT, tls_context: ssl.SSLContext | None = None,
                 require_starttls: bool = False, credentials: Mapping[str, str] | None = None,
                 auth_required: bool | None = None, auth_require_tls: bool | None = None,
                 data_size_limit: int = 64 * 1024 * 1024, smtputf8: bool = True,
                 eightbitmime: bool = True, pipelining: bool = False) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.host = host
        self.port = port
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = require_starttls
        self.credentials = dict(credentials or {})
        self.auth_required = bool(self.credentials) if auth_required is None else auth_required
        self.auth_require_tls = (tls_context is not None) if auth_require_tls is None else auth_require_tls
        self.data_size_limit = data_size_limit
        self.smtputf8 = smtputf8
        self.eightbitmime = eightbitmime
        self.pipelining = pipelining
        self._lock = threading.Lock()
        self._rules: tuple[Rule, ...] = tuple(rules)
        self._rule_hits: dict[tuple[int, str], int] = {}
        self._mode = Mode(mode)
        self._mode_times: int | None = None
        self._released = threading.Event()  # HOLD_GREETING: the held connections may go on
        self._listener: socket.socket | None = None
        self._accepting: set[asyncio.Task[Any]] = set()
        self._placeholder: socket.socket | None = None  # holds the port while refusing
        self._connections: set[_SinkSMTP] = set()
        self._connection_numbers = itertools.count(1)
        self.reset_stats()

    def __repr__(self) -> str:
        return f"Sink({self.host}:{self.port}, {self._mode.value})"

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    # -- behaviour --------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(self, mode: Mode | str, times: int | None = None) -> None:
        """Behave so from now on; with ``times``, only for the next N connections (greeting
        modes) or messages (after-DATA modes), then accept again. Switching to or from
        REFUSE closes (dropping every open connection, as a host that goes down does) or reopens
        the listening socket before returning."""
        mode = Mode(mode)
        if times is not None and mode not in _PER_CONNECTION | _PER_MESSAGE:
            raise ValueError(f"times applies to greeting and after-DATA modes, not {mode.value}")
        if mode is Mode.HOLD_GREETING:
            self._released.clear()
        with self._lock:
            self._mode, self._mode_times = mode, times
        self._in_loop(self._sync_listening)

    def release(self) -> None:
        """Let the connections held by HOLD_GREETING go on (greeted, then served as usual);
        new connections are accepted normally from now on."""
        with self._lock:
            if self._mode is Mode.HOLD_GREETING:
                self._mode, self._mode_times = Mode.ACCEPT, None
        self._released.set()

    def add_rule(self, pattern: str, reply: str, times: int | None = None) -> Rule:
        """Add a rule after the existing ones (the first match wins)."""
        rule = Rule(pattern, reply, times)
        with self._lock:
            self._rules += (rule,)
        return rule

    def set_rules(self, rules: Iterable[Rule]) -> None:
        with self._lock:
            self._rules = tuple(rules)
            self._rule_hits.clear()

    def clear_rules(self) -> None:
        self.set_rules(())

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    def rcpt_reply(self, address: str) -> str:
        """The reply to RCPT TO ``address`` now (counts as an attempt)."""
        with self._lock:
            for index, rule in enumerate(self._rules):
                if not rule.matches(address):
                    continue
                if rule.times is None:
                    return rule.reply
                key = (index, address.lower())
                hits = self._rule_hits.get(key, 0)
                if hits < rule.times:
                    self._rule_hits[key] = hits + 1
                    return rule.reply
                return ACCEPT
        return ACCEPT

    def _take_mode(self, kinds: set[Mode]) -> Mode:
        """The mode for the connection or message starting now, counting down ``times``."""
        with self._lock:
            mode = self._mode
            if mode not in kinds:
                return Mode.ACCEPT
            if self._mode_times is not None:
                self._mode_times -= 1
                if self._mode_times <= 0:
                    self._mode, self._mode_times = Mode.ACCEPT, None
            return mode

    # -- counters -------------------------------------------------------------------------

    def reset_stats(self) -> None:
        with self._lock:
            # connection number -> MAIL FROM count; numbers keep counting across resets
            self._transactions: dict[int, int] = {}
            self._messages = 0
            self._rcpt_replies: list[tuple[str, int]] = []

    def stats(self) -> SinkStats:
        with self._lock:
            return SinkStats(len(self._transactions), tuple(self._transactions.values()), self._messages,
                             tuple(self._rcpt_replies))

    def messages(self, domain: str) -> list[dict[str, Any]]:
        """What this sink's folder holds for ``domain`` (see :func:`list_messages`)."""
        return list_messages(self.folder, domain)

    # -- serving --------------------------------------------------------------------------

    async def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._listen()
        self._sync_listening()
        log.info("SMTP sink on %s:%d storing into %s", self.host, self.port, self.folder)

    def _family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def _listen(self) -> None:
        # Our own accept loop rather than asyncio.Server: listening can then stop and start
        # again synchronously, so "refuse" takes effect before set_mode() returns.
        assert self._loop is not None
        sock = socket.create_server((self.host, self.port), family=self._family(), backlog=128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._loop.add_reader(sock.fileno(), self._accept)

    def _unlisten(self) -> None:
        if self._listener is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None

    def _accept(self) -> None:
        assert self._loop is not None and self._listener is not None
        loop = self._loop
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: log, keep listening
                log.warning("SMTP sink on %s:%d cannot accept: %s", self.host, self.port, exc)
                return
            conn.setblocking(False)
            task = loop.create_task(loop.connect_accepted_socket(lambda: self._protocol(loop), conn))
            self._accepting.add(task)
            task.add_done_callback(self._accepting.discard)

    def _sync_listening(self) -> None:
        """Listen unless refusing (runs on the loop). While refusing, a bound socket that does not
        listen holds the port: connections are refused, and nobody else takes the port."""
        if self._mode is Mode.REFUSE and self._listener is not None:
            self._unlisten()
            for conn in list(self._connections):  # a host that is down drops what it had open too
                conn.abort()
            self._placeholder = socket.socket(self._family(), socket.SOCK_STREAM)
            self._placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._placeholder.bind((self.host, self.port))
        elif self._mode is not Mode.REFUSE and self._listener is None:
            if self._placeholder is not None:
                self._placeholder.close()
                self._placeholder = None
            self._listen()

    async def _close(self) -> None:
        self._unlisten()
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        for task in list(self._accepting):
            task.cancel()
        for conn in list(self._connections):
            conn.abort()
        await asyncio.gather(*self._accepting, return_exceptions=True)
        await asyncio.sleep(0)  # let the aborted connections run connection_lost

    def _protocol(self, loop: asyncio.AbstractEventLoop) -> _SinkSMTP:
        return _SinkSMTP(
            _Handler(self), sink=self, hostname=self.hostname, ident="Mailyard SMTP sink",
            tls_context=self.tls_context, require_starttls=self.require_starttls,
            auth_require_tls=self.auth_require_tls,  # auth_required: see handle_MAIL
            authenticator=self._authenticate if self.credentials else None,
            data_size_limit=self.data_size_limit, enable_SMTPUTF8=self.smtputf8, loop=loop,
        )

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            expected = self.credentials.get(user)
            if expected is not None and hmac.compare_digest(auth_data.password, expected.encode()):
                return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)

    # -- storing --------------------------------------------------------------------------

    def store(self, envelope: Envelope, session: Session, connection: int, transaction: int) -> None:
        """Write the message once per recipient domain, with its envelope beside it."""
        content = envelope.original_content or b""
        by_domain: dict[str, list[str]] = {}
        for rcpt in envelope.rcpt_tos:
            by_domain.setdefault(recipient_domain(rcpt) or _NO_DOMAIN, []).append(rcpt)
        name = f"{time.time_ns():020d}.{os.getpid()}.{next(_sequence):06d}"
        received_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        for domain, rcpts in by_domain.items():
            folder = self.folder / domain
            folder.mkdir(parents=True, exist_ok=True)
            meta = {
                "mail_from": envelope.mail_from, "rcpt_to": rcpts, "rcpt_to_all": envelope.rcpt_tos,
                "peer": list(session.peer) if session.peer else None, "received_at": received_at,
                "connection": connection, "transaction": transaction, "tls": session.ssl is not None,
                "auth_user": session.auth_data if session.authenticated else None, "size": len(content),
                "mail_options": envelope.mail_options,
            }
            _write(folder / f"{name}.json", json.dumps(meta, indent=1).encode())
            _write(folder / f"{name}.eml", content)
        with self._lock:
            self._messages += 1


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def recipient_domain(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


class _Handler:
    """aiosmtpd hooks: the sink's rules and storage."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server: _SinkSMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if not self.sink.credentials:  # aiosmtpd offers AUTH even with nobody to log in
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        if not self.sink.eightbitmime:
            responses = [r for r in responses if r != "250-8BITMIME"]
        if self.sink.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server: _SinkSMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        # Checked here rather than by aiosmtpd's auth_required, which logs a warning on every
        # connection when AUTH may go in clear text, as smart-host tests want.
        if self.sink.auth_required and not session.authenticated:
            return "530 5.7.0 Authentication required"
        with self.sink._lock:
            self.sink._transactions[server.index] = self.sink._transactions.get(server.index, 0) + 1
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server: _SinkSMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        domain = recipient_domain(address)
        if domain and not _DOMAIN.match(domain):
            reply = "553 5.1.3 Bad recipient address syntax"
        else:
            reply = self.sink.rcpt_reply(address)
        with self.sink._lock:
            self.sink._rcpt_replies.append((address, int(reply[:3])))
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply

    async def handle_DATA(self, server: _SinkSMTP, session: Session, envelope: Envelope) -> str:
        with self.sink._lock:
            transaction = self.sink._transactions.get(server.index, 0)
        self.sink.store(envelope, session, server.index, transaction)
        mode = self.sink._take_mode(_PER_MESSAGE)
        if mode is Mode.DROP_AFTER_DATA:
            # Stored, and the client never hears so: SMTP's one unavoidable duplicate.
            server.abort()
            await asyncio.Event().wait()  # cancelled when the connection is gone
        elif mode is Mode.STALL_AFTER_DATA:
            await asyncio.Event().wait()  # until the client gives up or the sink stops
        return "250 2.6.0 Queued mail for delivery"


class _Session(Session):
    login_data = None  # aiosmtpd still sets this deprecated property and logs a warning each time


class _SinkSMTP(SMTP):
    """aiosmtpd's server with the sink's greeting behaviours and connection counting."""

    def __init__(self, handler: _Handler, *, sink: Sink, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.sink = sink
        self.index = -1

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def abort(self) -> None:
        """Drop the connection at once, without a reply."""
        if self.transport is not None:
            cast(asyncio.Transport, self.transport).abort()

    async def _handle_client(self) -> None:
        # Called once per connection (not again after STARTTLS): the place to count it and to
        # misbehave before the greeting. A private aiosmtpd method; the version is pinned below 2.
        with self.sink._lock:
            self.index = next(self.sink._connection_numbers)
            self.sink._transactions[self.index] = 0
        self.sink._connections.add(self)
        try:
            mode = self.sink._take_mode(_PER_CONNECTION)
            if mode is Mode.STALL_GREETING:
                await asyncio.Event().wait()
            elif mode is Mode.HOLD_GREETING:
                while not self.sink._released.is_set():  # (set from another thread: polled)
                    await asyncio.sleep(0.05)
            elif mode is Mode.REJECT_GREETING:
                await self.push(SERVICE_NOT_AVAILABLE)
                assert self.transport is not None
                self.transport.close()
                return
            await super()._handle_client()
        finally:
            self.sink._connections.discard(self)


def list_messages(folder: Path | str, domain: str) -> list[dict[str, Any]]:
    """What a sink stored under ``folder`` for ``domain``, oldest first.

    Each item: ``from`` (an address), ``to``, ``cc`` (lists of addresses), ``subject``,
    ``message_id``, ``date`` (headers, decoded), ``envelope_from``, ``envelope_to`` (this
    domain's recipients), ``peer``, ``received_at``, ``tls``, ``auth_user``, ``size``,
    ``mail_options`` (MAIL FROM's parameters) and ``file`` (the .eml's path).
    """
    directory = Path(folder) / (domain.strip().rstrip(".").lower() or _NO_DOMAIN)
    if not directory.is_dir():
        return []
    parser = BytesHeaderParser(policy=email.policy.default)
    items = []
    for eml in sorted(directory.glob("*.eml")):
        try:
            meta = json.loads(eml.with_suffix(".json").read_text())
        except FileNotFoundError:
            meta = {}
        with eml.open("rb") as f:
            headers = parser.parse(f)
        items.append({
            "from": next(iter(shown_addresses(headers, "From")), ""), "to": shown_addresses(headers, "To"),
            "cc": shown_addresses(headers, "Cc"), "subject": shown_text(headers, "Subject"),
            "message_id": shown_text(headers, "Message-ID").strip(), "date": shown_text(headers, "Date"),
            "envelope_from": meta.get("mail_from"), "envelope_to": meta.get("rcpt_to", []),
            "peer": meta.get("peer"), "received_at": meta.get("received_at"), "tls": meta.get("tls"),
            "auth_user": meta.get("auth_user"), "size": meta.get("size"), "file": str(eml),
            "mail_options": meta.get("mail_options", []),
        })
    return items


def read_message(file: Path | str) -> email.message.EmailMessage:
    """Parse one stored .eml."""
    with open(file, "rb") as f:
        msg = email.message_from_binary_file(f, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg
