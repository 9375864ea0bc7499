"""DKIM signing on an Edge (RFC 6376): what leaves for the Internet is signed with the key of
its From domain, when EdgeSync brought one (``mailyard org dkim new``); relaxed/relaxed
canonicalization, rsa-sha256. Mail whose From domain has no key leaves unsigned."""

from __future__ import annotations

import logging

import dkim

from mailyard import headers
from mailyard.org import DkimKey

log = logging.getLogger("mailyard.hub.dkim")

# What is signed: the fields RFC 6376 5.4.1 names first, each also once more than it occurs
# (oversigning: a field added later, a second From, breaks the signature)
SIGNED = [b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"in-reply-to", b"references",
          b"mime-version", b"content-type", b"content-transfer-encoding", b"sender", b"list-id"]


def sign(raw: bytes, keys: dict[str, DkimKey]) -> bytes:
    """``raw`` with a DKIM-Signature of its From domain's key in front (unchanged without one)."""
    domain = headers.from_domain(raw)
    key = keys.get(domain) if domain else None
    if key is None or domain is None:
        return raw
    try:
        signature = dkim.sign(raw, key.selector.encode(), domain.encode("idna"), key.private_key.encode(),
                              canonicalize=(b"relaxed", b"relaxed"), include_headers=SIGNED, linesep=b"\r\n")
    except (dkim.DKIMException, ValueError) as exc:
        log.warning("could not sign a message of %s: %s", domain, exc)
        return raw
    return signature + raw
