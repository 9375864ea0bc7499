"""Where mail for a domain goes: MX lookup with dnspython, with RFC 5321 and 7505 semantics.

- MX records in preference order, random order within a preference (load spreading);
- no MX record: the domain's own A/AAAA address (the implicit MX, RFC 5321 §5.1);
- a null MX (``MX 0 .``, RFC 7505) and a domain that does not exist (NXDOMAIN) are
  permanent: the recipients get an NDR;
- SERVFAIL, timeouts and unreachable name servers are transient: the queue retries.
The name servers are a setting (``transport.dns_servers``); tests and the demo point them
at a DNS server on loopback, a real deployment leaves them empty for the system resolver.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.resolver

from mailyard.addresses import a_label
from mailyard.errors import PermanentDeliveryError, TransientDeliveryError

NXDOMAIN = (554, "5.4.4", "SMTPSEND.DNS.NonExistentDomain; nonexistent domain")
NULL_MX = (550, "5.1.2", "SMTPSEND.DNS.NullMx; the domain accepts no mail (RFC 7505 null MX)")


@dataclass(frozen=True)
class Target:
    """One address to try, with the host name it came from."""

    host: str
    address: str
    preference: int = 0
    port: int | None = None  # None: the connector's port (25)


def _host_port(server: str) -> tuple[str, int | None]:
    """``"10.0.0.2"``, ``"127.0.0.1:5353"``, ``"::1"`` or ``"[::1]:5353"``."""
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if server.count(":") == 1:
        host, _, port = server.partition(":")
        return host, int(port)
    return server, None


_resolvers: dict[tuple[str, ...], dns.resolver.Resolver] = {}


def resolver_for(servers: list[str]) -> dns.resolver.Resolver:
    """This process's resolver for these name servers, with a cache that honours each
    record's TTL (a busy queue does not ask for the same MX record on every batch)."""
    key = tuple(servers)
    found = _resolvers.get(key)
    if found is None:
        found = _resolvers[key] = make_resolver(servers)
        found.cache = dns.resolver.Cache()
    return found


def make_resolver(servers: list[str], *, timeout: float = 3.0, lifetime: float = 8.0) -> dns.resolver.Resolver:
    """A resolver for ``["127.0.0.1:5353", "10.0.0.2"]``, or the system's when empty."""
    if not servers:
        resolver = dns.resolver.Resolver()
    else:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = []
        ports = {}
        for server in servers:
            host, port = _host_port(server)
            resolver.nameservers.append(host)
            if port:
                ports[host] = port
        resolver.nameserver_ports = ports
    resolver.timeout = timeout
    resolver.lifetime = lifetime
    resolver.cache = None
    return resolver


def _transient(what: str, exc: Exception) -> TransientDeliveryError:
    return TransientDeliveryError(
        451, "4.4.0", f"DNS query failed. The error was: SMTPSEND.DNS.{what}; {type(exc).__name__}"
    )


def _exchanges(resolver: dns.resolver.Resolver, domain: str) -> list[tuple[int, str]]:
    try:
        answer = resolver.resolve(domain, "MX")
    except dns.resolver.NXDOMAIN:
        raise PermanentDeliveryError(*NXDOMAIN) from None
    except dns.resolver.NoAnswer:
        return [(0, domain)]  # no MX: the implicit MX is the domain itself
    except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
        raise _transient("MxLookupFailed", exc) from None
    records = [(int(r.preference), r.exchange) for r in answer]
    if any(ex == dns.name.root for _, ex in records):
        raise PermanentDeliveryError(*NULL_MX)
    by_pref: dict[int, list[str]] = {}
    for pref, ex in records:
        by_pref.setdefault(pref, []).append(ex.to_text(omit_final_dot=True))
    out = []
    for pref in sorted(by_pref):
        hosts = by_pref[pref]
        random.shuffle(hosts)
        out += [(pref, h) for h in hosts]
    return out


def addresses(resolver: dns.resolver.Resolver, host: str) -> list[str]:
    """A then AAAA addresses of ``host``; [] if it has none. Transient errors raise."""
    found: list[str] = []
    errors = 0
    for rdtype in ("A", "AAAA"):
        try:
            found += [r.address for r in resolver.resolve(host, rdtype)]
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            errors += 1
            if errors == 2:
                raise _transient("HostLookupFailed", exc) from None
    return found


def resolve(resolver: dns.resolver.Resolver, domain: str) -> list[Target]:
    """The addresses to try for ``domain``, in order. Raises Permanent/TransientDeliveryError."""
    domain = a_label(domain)  # DNS knows an IDN by its A-labels
    targets: list[Target] = []
    transient: TransientDeliveryError | None = None
    exchanges = _exchanges(resolver, domain)
    for pref, host in exchanges:
        try:
            targets += [Target(host, a, pref) for a in addresses(resolver, host)]
        except TransientDeliveryError as exc:
            transient = exc
    if targets:
        return targets
    if transient is not None:
        raise transient
    if exchanges == [(0, domain)]:  # neither MX nor address: nothing can ever be delivered there
        raise PermanentDeliveryError(554, "5.4.4", f"SMTPSEND.DNS.NoMxOrAddress; {domain} has no MX and no address")
    raise TransientDeliveryError(451, "4.4.0", f"SMTPSEND.DNS.NoAddress; no address for the MX hosts of {domain}")
