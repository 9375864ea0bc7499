"""A small authoritative DNS server on loopback, serving a zone that tests change at will.

Send connectors look up MX records with dnspython against a configurable resolver; tests,
the demo and the benchmark point that resolver here. The server answers UDP and TCP on the
same host and port, from a :class:`Zone` that maps names to records and behaviours::

    zone = Zone()
    zone.add_mail_domain("fabrikam.example", "127.0.0.2")    # MX 10 mx.fabrikam.example + A
    zone.add("nomx.example", A("127.0.0.3"))                  # no MX: fall back to the A record
    zone.add("nullmx.example", NULL_MX)                       # RFC 7505: accepts no mail
    zone.set_behaviour("broken.example", Behaviour.SERVFAIL)
    with DnsServer(zone) as server:
        answer = server.resolver().resolve("fabrikam.example", "MX")

The server is authoritative for every name: a name the zone does not hold (nor holds names
below) is answered NXDOMAIN, never REFUSED, so that "this domain does not exist" is easy to
test. REFUSED is only given to names set to :attr:`Behaviour.REFUSED`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.resolver

from mailyard.internet.background import Service

log = logging.getLogger(__name__)

DEFAULT_TTL = 0  # records change while tests run: nothing should cache them
UDP_PAYLOAD = 512  # the classic limit; EDNS clients announce more


@dataclass(frozen=True)
class MX:
    preference: int
    exchange: str  # a host name; "." for a null MX

    def __post_init__(self) -> None:
        if not 0 <= self.preference <= 65535:
            raise ValueError(f"MX preference {self.preference} is not in 0..65535")


@dataclass(frozen=True)
class A:
    address: str

    def __post_init__(self) -> None:
        ipaddress.IPv4Address(self.address)


@dataclass(frozen=True)
class AAAA:
    address: str

    def __post_init__(self) -> None:
        ipaddress.IPv6Address(self.address)


@dataclass(frozen=True)
class TXT:
    """A TXT record (DKIM keys, SPF and DMARC policies): ``text`` is cut into strings of 255
    bytes at most, as RFC 1035 3.3.14 wants and resolvers join again."""

    text: str

    def __post_init__(self) -> None:
        self.text.encode("ascii")


Record = MX | A | AAAA | TXT

NULL_MX = MX(0, ".")  # RFC 7505: the domain accepts no mail

_TYPES: dict[type, str] = {MX: "MX", A: "A", AAAA: "AAAA", TXT: "TXT"}


class Behaviour(StrEnum):
    """What the server does for a name (or one record type of it) instead of answering."""

    NXDOMAIN = "nxdomain"  # the name does not exist, whatever records it holds
    SERVFAIL = "servfail"  # the server failed: resolvers try again or give up
    REFUSED = "refused"  # the server will not answer for this name
    NODATA = "nodata"  # the name exists but has no records (of that type): NOERROR, empty
    TIMEOUT = "timeout"  # never answer


@dataclass(frozen=True)
class Answer:
    """What the zone gives for one question."""

    rcode: dns.rcode.Rcode
    records: tuple[Record, ...] = ()


def normalize(name: str) -> str:
    """Names compare case-insensitively, with or without their trailing dot."""
    return name.strip().rstrip(".").lower()


def record_type(record: Record) -> str:
    return _TYPES[type(record)]


def _check(records: Iterable[Record]) -> None:
    for record in records:
        if type(record) not in _TYPES:
            raise TypeError(f"{record!r} is not an MX, A, AAAA or TXT record")


class Zone:
    """Names with their records and behaviours; safe to change from any thread while a
    server answers from it.

    ``records`` maps names to records, e.g. ``{"fabrikam.example": [MX(10, "mx.fabrikam.example")]}``.
    MX answers are served sorted by preference (records of equal preference keep the order
    they were added in).
    """

    def __init__(self, records: Mapping[str, Iterable[Record]] | None = None, *,
                 ttl: int = DEFAULT_TTL) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._records: dict[str, list[Record]] = {}
        self._behaviours: dict[tuple[str, str | None], Behaviour] = {}
        for name, recs in (records or {}).items():
            self.add(name, *recs)

    def add(self, name: str, *records: Record) -> None:
        """Add records to ``name``; with none, just make the name exist (it answers NODATA)."""
        _check(records)
        with self._lock:
            existing = self._records.setdefault(normalize(name), [])
            existing += [r for r in records if r not in existing]

    def remove(self, name: str, *records: Record) -> None:
        """Remove these records of ``name``; with none, remove the name, all its records and
        its behaviours (it answers NXDOMAIN again)."""
        key = normalize(name)
        with self._lock:
            if not records:
                self._records.pop(key, None)
                for k in [k for k in self._behaviours if k[0] == key]:
                    del self._behaviours[k]
            elif key in self._records:
                self._records[key] = [r for r in self._records[key] if r not in records]

    def replace(self, name: str, *records: Record) -> None:
        """Make ``records`` the only records of ``name`` (behaviours are kept)."""
        _check(records)
        with self._lock:
            self._records[normalize(name)] = list(dict.fromkeys(records))

    def add_mail_domain(self, domain: str, address: str, *, exchange: str | None = None,
                        preference: int = 10) -> str:
        """Give ``domain`` an MX record pointing at ``exchange`` (default ``mx.<domain>``) and
        give that host an A (or AAAA) record for ``address``. Returns the exchange's name."""
        host = normalize(exchange or f"mx.{normalize(domain)}")
        ip = ipaddress.ip_address(address)
        self.add(domain, MX(preference, host))
        self.add(host, A(address) if ip.version == 4 else AAAA(address))
        return host

    def set_behaviour(self, name: str, behaviour: Behaviour | str | None, rdtype: str | None = None) -> None:
        """Make ``name`` (for every query type, or only for ``rdtype``) behave so; ``None``
        clears it. The name need not hold records. A type-specific behaviour wins."""
        key = (normalize(name), rdtype.upper() if rdtype else None)
        with self._lock:
            if behaviour is None:
                self._behaviours.pop(key, None)
            else:
                self._behaviours[key] = Behaviour(behaviour)

    def records(self, name: str, rdtype: str | None = None) -> list[Record]:
        with self._lock:
            recs = list(self._records.get(normalize(name), ()))
        return [r for r in recs if rdtype is None or record_type(r) == rdtype.upper()]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._records)

    def resolve(self, name: str, rdtype: str) -> Answer | None:
        """What the server answers for ``name``/``rdtype``; ``None`` means no answer at all."""
        key, rdtype = normalize(name), rdtype.upper()
        with self._lock:
            behaviour = self._behaviours.get((key, rdtype)) or self._behaviours.get((key, None))
            recs = self._records.get(key)
            # A name with names below it exists even without records (an empty non-terminal).
            exists = recs is not None or any(n.endswith("." + key) for n in self._records) or key == ""
        if behaviour is Behaviour.TIMEOUT:
            return None
        if behaviour is Behaviour.NODATA:
            return Answer(dns.rcode.NOERROR)
        if behaviour is not None:
            return Answer(dns.rcode.Rcode[behaviour.name])
        if not exists:
            return Answer(dns.rcode.NXDOMAIN)
        matching = [r for r in recs or () if rdtype == "ANY" or record_type(r) == rdtype]
        if rdtype == "MX":
            matching.sort(key=lambda r: r.preference if isinstance(r, MX) else 0)
        return Answer(dns.rcode.NOERROR, tuple(matching))


def _rdata(record: Record) -> dns.rdata.Rdata:
    if isinstance(record, MX):
        exchange = "." if normalize(record.exchange) == "" else normalize(record.exchange) + "."
        return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.MX, f"{record.preference} {exchange}")
    if isinstance(record, TXT):
        chunks = [record.text[i:i + 255] for i in range(0, len(record.text), 255)] or [""]
        quoted = (c.replace("\\", "\\\\").replace('"', '\\"') for c in chunks)
        return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, " ".join(f'"{c}"' for c in quoted))
    return dns.rdata.from_text(dns.rdataclass.IN, record_type(record), record.address)


def make_resolver(host: str, port: int, *, timeout: float = 2.0) -> dns.resolver.Resolver:
    """A dnspython resolver that asks only ``host:port`` and caches nothing."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.nameserver_ports = {host: port}
    resolver.port = port
    resolver.timeout = timeout
    resolver.lifetime = timeout
    return resolver


class DnsServer(Service):
    """Answers DNS queries from ``zone`` over UDP and TCP on ``host:port``.

    ``port=0`` picks a port that is free for both protocols; ``port`` holds the bound one
    once the server runs. ``queries`` counts the queries received.
    """

    _thread_name = "dns-server"

    def __init__(self, zone: Zone | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__()
        self.zone = zone if zone is not None else Zone()
        self.host = host
        self.port = port
        self.queries = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_writers: set[asyncio.StreamWriter] = set()

    def __repr__(self) -> str:
        return f"DnsServer({self.host}:{self.port})"

    @property
    def address(self) -> str:
        """``host:port``, the way ``--dns`` and ``dns_servers`` write it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def resolver(self, *, timeout: float = 2.0) -> dns.resolver.Resolver:
        return make_resolver(self.host, self.port, timeout=timeout)

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        udp_sock, tcp_sock = _bind_pair(self.host, self.port)
        self.port = udp_sock.getsockname()[1]
        try:
            self._udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=udp_sock)
            self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp_sock)
        except BaseException:
            await self._close()
            raise
        log.info("DNS server on %s (UDP and TCP)", self.address)

    async def _close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._tcp_writers):
                writer.close()
            await self._tcp.wait_closed()
            self._tcp = None

    def answer(self, wire: bytes, max_size: int) -> bytes | None:
        """The response to one query in wire format, or ``None`` to stay silent."""
        self.queries += 1
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return _formerr(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
        elif len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
        else:
            question = query.question[0]
            name = question.name.to_text(omit_final_dot=True)
            result = self.zone.resolve(name, dns.rdatatype.to_text(question.rdtype))
            if result is None:
                return None
            response.set_rcode(result.rcode)
            for record in result.records:
                rrset = response.find_rrset(response.answer, question.name, dns.rdataclass.IN,
                                            dns.rdatatype.from_text(record_type(record)), create=True)
                rrset.add(_rdata(record), self.zone.ttl)
        if query.edns >= 0:
            max_size = max(max_size, query.payload)
        # dnspython shuffles records by default; serve them in the zone's order (MX by preference).
        return response.to_wire(max_size=max_size, prefer_truncation=True, want_shuffle=False)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tcp_writers.add(writer)
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                reply = self.answer(await reader.readexactly(length), 65535)
                if reply is not None:  # a timeout: keep the connection, never answer
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_writers.discard(writer)
            writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = self.server.answer(data, UDP_PAYLOAD)
        except Exception:  # one bad query must not stop the server
            log.exception("DNS query from %s failed", addr)
            return
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def _formerr(wire: bytes) -> bytes | None:
    """FORMERR for a query we cannot parse, if at least its header is there."""
    if len(wire) < 12:
        return None
    (qid,) = struct.unpack("!H", wire[:2])
    response = dns.message.Message(id=qid)
    response.flags = dns.flags.QR
    response.set_rcode(dns.rcode.FORMERR)
    return response.to_wire()


def _bind_pair(host: str, port: int, attempts: int = 20) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket bound to the same ``host:port`` (``port=0``: one free for both)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(attempts):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            udp.bind((host, port))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, udp.getsockname()[1]))
            tcp.listen(128)
        except OSError as exc:
            udp.close()
            tcp.close()
            if port or exc.errno != errno.EADDRINUSE:
                raise
            continue  # the free UDP port is taken for TCP: try another
        udp.setblocking(False)
        tcp.setblocking(False)
        return udp, tcp
    raise OSError(errno.EADDRINUSE, f"no port free for both UDP and TCP on {host}")


def parse_address(value: str, default_port: int = 53) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` → (host, port)."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":")
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, ""
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise ValueError(f"{value!r} is not HOST:PORT") from None
