"""Sender filtering (Exchange's Sender Filter agent), at MAIL FROM: a blocked sender, a blocked
domain, or a subdomain of a domain blocked with its subdomains gets ``554 5.1.0 Sender Denied``;
with ``blank_sender_blocking``, so does the null sender (``MAIL FROM:<>``)."""

from __future__ import annotations

from mailyard.addresses import canonical
from mailyard.org import AntispamSettings

DENIED = "554 5.1.0 Sender Denied"


def refusal(settings: AntispamSettings, sender: str) -> str | None:
    """Why ``sender`` (empty: the null sender) is refused, for the log; None if it is not."""
    if not sender:
        return "the null sender is blocked" if settings.blank_sender_blocking else None
    address = canonical(sender)
    domain = address.rpartition("@")[2]
    if address in settings.blocked_senders:
        return f"{address} is a blocked sender"
    if domain in settings.blocked_domains:
        return f"{domain} is a blocked domain"
    for blocked in settings.blocked_domains_and_subdomains:
        if domain == blocked or domain.endswith("." + blocked):
            return f"{domain} is in blocked domain {blocked} (with its subdomains)"
    return None
