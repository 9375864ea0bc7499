"""DKIM keys of the organization's domains (``mailyard org dkim``): made here, kept in the
organization's Redis (``my:dkim:keys``), pushed by EdgeSync to the Edges, which sign with them
what leaves for the Internet (RFC 6376; RSA 2048 and rsa-sha256, as RFC 8301 wants at least).
The public half is published by the domain's owner as a TXT record at
``<selector>._domainkey.<domain>`` (the domain as A-labels).

A new key of ``mailyard org dkim new`` is *pending*: nothing signs with it until ``activate``
(or ``new --activate``), once its TXT record is published, so no receiver meets a signature
whose key it cannot find yet. Meanwhile the domain's *active* key, if it has one, goes on
signing; activating replaces it. A domain has at most one of each: in ``my:dkim:keys``, field
``<domain>`` holds its active key and ``<domain>/pending`` its pending one (a second ``new``
replaces that). EdgeSync pushes the active keys only (``edgesync.config_push``)."""

from __future__ import annotations

import base64
import re
import time

import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailyard import keys
from mailyard.addresses import a_label, normalize_domain
from mailyard.errors import SiteError
from mailyard.org import DkimKey
from mailyard.orgstore import read_org
from mailyard.redisconn import text_map

KEY_BITS = 2048
TXT_CHUNK = 255  # a TXT record's strings are at most 255 octets each (RFC 1035 3.3.14)
PENDING = "/pending"  # the hash field of a domain's pending key: <domain>/pending
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def check_selector(selector: str) -> str:
    """The selector as stored (lower case); ValueError unless it is one DNS label."""
    value = selector.strip().lower()
    if not _LABEL.match(value):
        raise ValueError(f"{selector!r} is not a selector: one DNS label (letters, digits and hyphens, "
                         "at most 63, not starting or ending with a hyphen)")
    return value


def canonical_domain(domain: str) -> str:
    """``domain`` as keys are stored under it (lower case, U-labels, no trailing dot);
    SiteError if it is not a domain name."""
    try:
        return normalize_domain(domain)
    except ValueError as exc:
        raise SiteError(str(exc)) from None


def txt_name(key: DkimKey) -> str:
    return f"{key.selector}._domainkey.{a_label(key.domain)}"


def txt_value(key: DkimKey) -> str:
    """The record to publish: ``v=DKIM1; k=rsa; p=<the public key, DER, base64>``."""
    private = serialization.load_pem_private_key(key.private_key.encode(), password=None)
    der = private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def txt_strings(value: str) -> list[str]:
    """The record's value cut into the strings of at most 255 octets a TXT record holds
    (a verifier joins them: RFC 6376 3.6.2.2)."""
    return [value[i:i + TXT_CHUNK] for i in range(0, len(value), TXT_CHUNK)] or [""]


def zone_line(key: DkimKey) -> str:
    """The TXT record as a zone file line: its value as quoted strings of at most 255 octets."""
    quoted = " ".join(f'"{s}"' for s in txt_strings(txt_value(key)))
    return f"{txt_name(key)}.  IN TXT  {quoted}"


def _read(r: redis.Redis) -> dict[str, DkimKey]:
    return {field: DkimKey.model_validate_json(v) for field, v in text_map(r.hgetall(keys.DKIM_KEYS)).items()}


def _default_selector(now: float, taken: set[str]) -> str:
    base = time.strftime("my%Y%m", time.gmtime(now))
    return next(s for s in (base, *(f"{base}-{n}" for n in range(2, 1000))) if s not in taken)


def new_key(r: redis.Redis, domain: str, selector: str | None = None, now: float | None = None, *,
            activate: bool = True) -> DkimKey:
    """A new key for an accepted domain. ``activate``: it signs at once, replacing the active
    key, for a caller that publishes the record itself (the demo's DNS does); ``mailyard org
    dkim new`` passes False unless ``--activate``: the key is then pending (replacing the
    domain's pending key, if any) until ``activate_key``. The selector of a pending key must
    differ from the active key's (the two records are published side by side); by default
    ``myYYYYMM``, with ``-2``... if taken. ValueError for a selector that is not a DNS label."""
    domain = canonical_domain(domain)
    _, org = read_org(r)
    if domain not in org.accepted_domains:
        raise SiteError(f"{domain} is not an accepted domain of the organization "
                        f"({', '.join(org.accepted_domains)})")
    current = _read(r).get(domain)
    now = time.time() if now is None else now
    if selector is None:
        selector = _default_selector(now, {current.selector} if current and not activate else set())
    else:
        selector = check_selector(selector)
        if current is not None and current.selector == selector and not activate:
            raise SiteError(f"{selector} is the selector of {domain}'s active key: the new key needs another, "
                            "so that both records can be published side by side")
    private = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    key = DkimKey(domain=domain, selector=selector, private_key=pem, created=now, active=activate)
    if activate:
        pipe = r.pipeline(transaction=True)
        pipe.hset(keys.DKIM_KEYS, domain, key.model_dump_json())
        pipe.hdel(keys.DKIM_KEYS, domain + PENDING)
        pipe.execute()
    else:
        r.hset(keys.DKIM_KEYS, domain + PENDING, key.model_dump_json())
    return key


def activate_key(r: redis.Redis, domain: str, selector: str) -> DkimKey:
    """Make the domain's pending key (of ``selector``) the one that signs, in place of its
    active key. SiteError if there is no such pending key."""
    domain = canonical_domain(domain)
    selector = selector.strip().lower()
    with r.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(keys.DKIM_KEYS)
                found = {f: DkimKey.model_validate_json(v) for f, v in text_map(pipe.hgetall(keys.DKIM_KEYS)).items()
                         if f in (domain, domain + PENDING)}
                pending, current = found.get(domain + PENDING), found.get(domain)
                if pending is None or pending.selector != selector:
                    if current is not None and current.selector == selector:
                        raise SiteError(f"the key {selector} of {domain} is active already")
                    raise SiteError(f"{domain} has no pending DKIM key {selector} (`mailyard org dkim list`)")
                key = pending.model_copy(update={"active": True})
                pipe.multi()
                pipe.hset(keys.DKIM_KEYS, domain, key.model_dump_json())
                pipe.hdel(keys.DKIM_KEYS, domain + PENDING)
                pipe.execute()
                return key
            except redis.WatchError:
                continue


def all_keys(r: redis.Redis) -> list[DkimKey]:
    """Every key, active and pending, by domain (a domain's active key first)."""
    return sorted(_read(r).values(), key=lambda k: (k.domain, not k.active))


def signing_keys(r: redis.Redis) -> list[DkimKey]:
    """The active keys: what the Edges sign with."""
    return [k for k in all_keys(r) if k.active]


def remove_key(r: redis.Redis, domain: str, selector: str | None = None) -> list[DkimKey]:
    """Remove the domain's keys (active and pending), or only its key of ``selector``; the
    keys removed. SiteError if there was none."""
    domain = canonical_domain(domain)
    found = {f: k for f, k in _read(r).items() if f in (domain, domain + PENDING)
             and (selector is None or k.selector == selector.strip().lower())}
    if not found or not r.hdel(keys.DKIM_KEYS, *found):
        which = f"DKIM key {selector.strip().lower()}" if selector else "DKIM key"
        raise SiteError(f"{domain} has no {which} (`mailyard org dkim list`)")
    return sorted(found.values(), key=lambda k: not k.active)
