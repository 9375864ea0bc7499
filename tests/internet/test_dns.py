"""The demo DNS server, queried with dnspython over real UDP and TCP sockets."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import dns.asyncresolver
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest

from mailyard.internet.dns import AAAA, MX, NULL_MX, A, Behaviour, DnsServer, Zone, make_resolver


@pytest.fixture
def zone() -> Zone:
    return Zone({
        "fabrikam.example": [MX(20, "mx2.fabrikam.example"), MX(10, "mx1.fabrikam.example"),
                             MX(30, "mx3.fabrikam.example")],
        "mx1.fabrikam.example": [A("127.0.0.2"), AAAA("::1")],
        "mx2.fabrikam.example": [A("127.0.0.3")],
        "nomx.example": [A("127.0.0.4")],
        "nullmx.example": [NULL_MX],
    })


@pytest.fixture
def server(zone: Zone) -> Iterator[DnsServer]:
    with DnsServer(zone) as server:
        yield server


@pytest.fixture
def resolver(server: DnsServer) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.nameserver_ports = {"127.0.0.1": server.port}
    r.port = server.port
    r.timeout = r.lifetime = 2.0
    return r


def mx(resolver: dns.resolver.Resolver, name: str, tcp: bool = False) -> list[tuple[int, str]]:
    return [(r.preference, r.exchange.to_text().lower()) for r in resolve(resolver, name, "MX", tcp)]


def resolve(resolver: dns.resolver.Resolver, name: str, rdtype: str, tcp: bool = False) -> dns.resolver.Answer:
    return resolver.resolve(name, rdtype, tcp=tcp, search=False)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_mx_records_are_served_sorted_by_preference(resolver, tcp) -> None:
    assert mx(resolver, "fabrikam.example", tcp) == [
        (10, "mx1.fabrikam.example."), (20, "mx2.fabrikam.example."), (30, "mx3.fabrikam.example.")]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_a_and_aaaa_records(resolver, tcp) -> None:
    assert [r.address for r in resolve(resolver, "mx1.fabrikam.example", "A", tcp)] == ["127.0.0.2"]
    assert [r.address for r in resolve(resolver, "mx1.fabrikam.example", "AAAA", tcp)] == ["::1"]


def test_names_are_case_insensitive_and_trailing_dot_tolerant(resolver, zone) -> None:
    zone.add("Tailspintoys.Example.", MX(5, "MX.Tailspintoys.Example"))
    assert mx(resolver, "TAILSPINTOYS.example.") == [(5, "mx.tailspintoys.example.")]
    assert zone.records("tailspintoys.example") == [MX(5, "MX.Tailspintoys.Example")]


def test_the_answer_is_authoritative_and_carries_the_zone_ttl(resolver, server) -> None:
    answer = resolve(resolver, "fabrikam.example", "MX")
    assert answer.response.flags & dns.flags.AA
    assert answer.rrset.ttl == server.zone.ttl


def test_an_unknown_name_is_nxdomain(resolver) -> None:
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(resolver, "nowhere.example", "MX")


def test_a_name_without_mx_answers_empty_so_the_sender_falls_back_to_a(resolver) -> None:
    # NOERROR with no answer (NODATA), not NXDOMAIN: the domain exists, its A record is the MX.
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(resolver, "nomx.example", "MX")
    assert [r.address for r in resolve(resolver, "nomx.example", "A")] == ["127.0.0.4"]


def test_a_parent_of_existing_names_exists_without_records(resolver) -> None:
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(resolver, "example", "MX")


def test_null_mx(resolver) -> None:
    assert mx(resolver, "nullmx.example") == [(0, ".")]


def test_servfail(resolver, zone) -> None:
    zone.set_behaviour("fabrikam.example", Behaviour.SERVFAIL)
    with pytest.raises(dns.resolver.NoNameservers, match="SERVFAIL"):
        resolve(resolver, "fabrikam.example", "MX")
    zone.set_behaviour("fabrikam.example", None)
    assert mx(resolver, "fabrikam.example")[0] == (10, "mx1.fabrikam.example.")


def test_behaviours_can_apply_to_one_record_type(resolver, zone) -> None:
    zone.set_behaviour("mx1.fabrikam.example", Behaviour.NODATA, rdtype="aaaa")
    zone.set_behaviour("mx1.fabrikam.example", Behaviour.NXDOMAIN, rdtype="MX")
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(resolver, "mx1.fabrikam.example", "AAAA")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(resolver, "mx1.fabrikam.example", "MX")
    assert [r.address for r in resolve(resolver, "mx1.fabrikam.example", "A")] == ["127.0.0.2"]


def test_refused_is_only_given_on_request(server, zone) -> None:
    zone.set_behaviour("fabrikam.example", Behaviour.REFUSED)
    query = dns.message.make_query("fabrikam.example", "MX")
    assert dns.query.udp(query, "127.0.0.1", port=server.port, timeout=2).rcode() == dns.rcode.REFUSED
    query = dns.message.make_query("nowhere.example", "MX")
    assert dns.query.udp(query, "127.0.0.1", port=server.port, timeout=2).rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_timeout_never_answers(server, zone, tcp) -> None:
    zone.set_behaviour("fabrikam.example", Behaviour.TIMEOUT)
    resolver = make_resolver("127.0.0.1", server.port, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(dns.resolver.LifetimeTimeout):
        resolver.resolve("fabrikam.example", "MX", tcp=tcp)
    assert time.monotonic() - started < 2
    # The server is still fine for other names.
    assert [r.address for r in resolver.resolve("nomx.example", "A", tcp=tcp)] == ["127.0.0.4"]


def test_records_change_while_the_server_runs(resolver, zone) -> None:
    zone.add("wingtiptoys.example", MX(10, "mx.wingtiptoys.example"))
    assert mx(resolver, "wingtiptoys.example") == [(10, "mx.wingtiptoys.example.")]
    zone.add("wingtiptoys.example", MX(5, "backup.wingtiptoys.example"))
    assert [p for p, _ in mx(resolver, "wingtiptoys.example")] == [5, 10]
    zone.remove("wingtiptoys.example", MX(5, "backup.wingtiptoys.example"))
    assert mx(resolver, "wingtiptoys.example") == [(10, "mx.wingtiptoys.example.")]
    zone.replace("wingtiptoys.example", A("127.0.0.9"))
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(resolver, "wingtiptoys.example", "MX")
    zone.remove("wingtiptoys.example")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(resolver, "wingtiptoys.example", "A")


def test_add_mail_domain_gives_an_mx_and_its_address(resolver, zone) -> None:
    host = zone.add_mail_domain("contoso-partner.example", "127.0.0.7")
    assert host == "mx.contoso-partner.example"
    assert mx(resolver, "contoso-partner.example") == [(10, "mx.contoso-partner.example.")]
    assert [r.address for r in resolve(resolver, host, "A")] == ["127.0.0.7"]


def test_a_large_answer_is_truncated_over_udp_and_complete_over_tcp(server, zone) -> None:
    zone.add("big.example", *[A(f"127.0.1.{i}") for i in range(1, 60)])
    query = dns.message.make_query("big.example", "A", use_edns=False)
    udp = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=2)
    assert udp.flags & dns.flags.TC
    tcp = dns.query.tcp(query, "127.0.0.1", port=server.port, timeout=2)
    assert len(tcp.answer[0]) == 59


def test_a_malformed_query_gets_formerr(server) -> None:
    query = dns.message.make_query("fabrikam.example", "MX")
    wire = query.to_wire()[:-3]  # cut into the question
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(wire, ("127.0.0.1", server.port))
        reply = dns.message.from_wire(s.recv(512))
    assert reply.id == query.id and reply.rcode() == dns.rcode.FORMERR


def test_the_async_api_runs_inside_an_existing_loop(zone) -> None:
    async def main() -> list[str]:
        async with DnsServer(zone) as server:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
            resolver.port = server.port
            resolver.lifetime = 2
            answer = await resolver.resolve("mx2.fabrikam.example", "A")
            return [r.address for r in answer]

    assert asyncio.run(main()) == ["127.0.0.3"]


def test_two_servers_and_a_restart_get_their_own_ports(zone) -> None:
    with DnsServer(zone) as one, DnsServer(zone, "127.0.0.5") as two:
        assert one.port and two.port
        assert [r.address for r in two.resolver().resolve("nomx.example", "A")] == ["127.0.0.4"]
        port = one.port
    with DnsServer(zone, port=port) as again:
        assert [r.address for r in again.resolver().resolve("nomx.example", "A")] == ["127.0.0.4"]
