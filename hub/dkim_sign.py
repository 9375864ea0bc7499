"""DKIM signing on an Edge (RFC 6376): what leaves for the Internet is signed with the key of
its From domain, when EdgeSync brought one (``mailyard org dkim new``, then ``activate``: only
the active key of a domain signs); relaxed/relaxed canonicalization, rsa-sha256. Mail whose
From domain has no key leaves unsigned.

What is signed is what goes on the wire: ``send`` signs each message after ``encoding.plan``
decided how it travels to that peer (a peer without 8BITMIME gets it re-encoded as 7-bit MIME,
and a signature of the 8-bit original would fail there). Only mail of the organization is
signed (``records.Message.from_organization``): Internet mail that comes in and goes out again
(to a group's external member, a contact) keeps whatever From it claims, unsigned by us.

The From domain is read as RFC 6532 allows (UTF-8 header text) and matched to a key by its
canonical form (lower case, U-labels, no trailing dot), so ``bücher.example`` written as
UTF-8 or as ``xn--bcher-kva.example`` finds that domain's key; ``d=`` carries the A-labels.
"""

from __future__ import annotations

import logging
from collections import Counter

import dkim

from mailyard import headers
from mailyard.addresses import a_label, normalize_domain
from mailyard.org import DkimKey

log = logging.getLogger("mailyard.hub.dkim")

# What is signed: the fields RFC 6376 5.4.1 names first, each listed once more than it occurs
# (oversigning, RFC 6376 8.15: the extra entry signs the field's absence, so a field added
# later, a second From or Subject above the signed one, breaks the signature). A field the
# message lacks is listed once: its absence is signed.
SIGNED = [b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"reply-to", b"in-reply-to", b"references",
          b"mime-version", b"content-type", b"content-transfer-encoding", b"sender", b"list-id"]


def signing_domain(raw: bytes) -> str | None:
    """The canonical domain of a message's one From address (lower case, U-labels), read
    with its 8-bit header text as UTF-8; None if it has none, several, or an invalid one."""
    try:
        found = [a for _, a in headers.addresses(headers.parse(raw), "From") if "@" in a]
    except ValueError:
        return None
    if len(found) != 1:
        return None
    try:
        return normalize_domain(found[0].rpartition("@")[2])
    except ValueError:
        return None


def key_for(raw: bytes, keys: dict[str, DkimKey]) -> DkimKey | None:
    """The active key that signs ``raw``: its From domain's, matched by U-labels or A-labels."""
    domain = signing_domain(raw)
    if domain is None:
        return None
    wanted = {domain, a_label(domain)}
    return next((k for k in keys.values() if k.active and {k.domain.lower(), a_label(k.domain)} & wanted), None)


def include_headers(raw: bytes) -> list[bytes]:
    """``h=``: each of SIGNED once more than the message has it."""
    names = Counter(name.lower() for name, _ in dkim.rfc822_parse(raw)[0])
    return [name for name in SIGNED for _ in range(names[name] + 1)]


def sign(raw: bytes, keys: dict[str, DkimKey]) -> bytes:
    """``raw`` with a DKIM-Signature of its From domain's key in front (unchanged without one)."""
    key = key_for(raw, keys)
    if key is None:
        return raw
    domain = a_label(key.domain)
    try:
        signature = dkim.sign(raw, key.selector.encode(), domain.encode(), key.private_key.encode(),
                              canonicalize=(b"relaxed", b"relaxed"), include_headers=include_headers(raw),
                              linesep=b"\r\n")
    except (dkim.DKIMException, ValueError) as exc:
        log.warning("could not sign a message of %s: %s", domain, exc)
        return raw
    return signature + raw
