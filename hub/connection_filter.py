"""Connection filtering, the first anti-spam agent (Exchange's Connection Filtering agent):
the client's IP address against the IP Allow list, the IP Block list and the DNS block list
providers (RFC 5782).

- On the allow list: every later agent is skipped for the session.
- On the block list: ``550 5.7.1 External client with IP address <ip> does not have
  permissions to submit to this server.`` at MAIL FROM.
- Listed by a provider: ``550 5.7.1 Recipient not authorized, your IP has been found on a
  block list`` (or the provider's RejectionResponse) at each RCPT TO, so that the attempt is
  logged. The lookup is ``<reversed octets>.<lookup domain>`` for an A record, once a session;
  an answer counts as a listing if it is in 127.0.0.0/8 and matches the provider's bitmask or
  addresses (without either, any such answer but 127.255.255.x, the error codes some lists
  answer with). IPv6 clients are not looked up (as Exchange).
"""

from __future__ import annotations

import ipaddress

import dns.exception
import dns.resolver

from mailyard.org import AntispamSettings, BlockListProvider, parse_ip_range

BLOCKED_TEXT = "External client with IP address {0} does not have permissions to submit to this server."
LISTED_TEXT = "Recipient not authorized, your IP has been found on a block list"


def in_ranges(ip: str, ranges: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    for value in ranges:
        lo, hi = parse_ip_range(value)
        if lo.version == address.version and int(lo) <= int(address) <= int(hi):
            return True
    return False


def allowed(settings: AntispamSettings, ip: str) -> bool:
    return in_ranges(ip, settings.ip_allow_list)


def blocked_reply(settings: AntispamSettings, ip: str) -> str | None:
    return f"550 5.7.1 {BLOCKED_TEXT.format(ip)}" if in_ranges(ip, settings.ip_block_list) else None


def query_name(ip: str, provider: BlockListProvider) -> str | None:
    """RFC 5782 2.1: 192.0.2.99 -> 99.2.0.192.<lookup domain>. (None for IPv6.)"""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if address.version != 4:
        return None
    return ".".join(reversed(str(address).split("."))) + "." + provider.lookup_domain + "."


def is_listing(answer: str, provider: BlockListProvider) -> bool:
    try:
        value = ipaddress.IPv4Address(answer)
    except ValueError:
        return False
    if not str(value).startswith("127."):
        return False
    if provider.addresses:
        return answer in provider.addresses
    if provider.bitmask is not None:
        return bool(int(value) & 0xFF & provider.bitmask)
    return not str(value).startswith("127.255.255.")


def lookup(resolver: dns.resolver.Resolver, ip: str, provider: BlockListProvider) -> list[str]:
    """The provider's answers for ``ip`` (empty: not listed, or the list did not answer: a list
    that is down must not stop mail)."""
    name = query_name(ip, provider)
    if name is None:
        return []
    try:
        return [r.to_text() for r in resolver.resolve(name, "A", search=False)]
    except dns.exception.DNSException:  # NXDOMAIN, no answer, SERVFAIL, a timeout, a name too long
        return []


def listed_reply(provider: BlockListProvider, ip: str) -> str:
    text = provider.rejection_response or LISTED_TEXT
    return "550 5.7.1 " + text.format(ip, provider.name, provider.lookup_domain)


def check(resolver: dns.resolver.Resolver, settings: AntispamSettings, ip: str) -> tuple[str, str] | None:
    """The first provider that lists ``ip``: (the reply, what the log says), else None."""
    for provider in settings.block_list_providers:
        hits = [a for a in lookup(resolver, ip, provider) if is_listing(a, provider)]
        if hits:
            return listed_reply(provider, ip), f"{ip} listed by {provider.name} ({provider.lookup_domain}: {hits[0]})"
    return None
