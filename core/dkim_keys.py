"""DKIM keys of the organization's domains (``mailyard org dkim new DOMAIN``): made here, kept
in the organization's Redis (``my:dkim:keys``), pushed by EdgeSync to the Edges, which sign
with them what leaves for the Internet (RFC 6376; RSA 2048 and rsa-sha256, as RFC 8301 wants
at least). The public half is published by the domain's owner as a TXT record at
``<selector>._domainkey.<domain>``."""

from __future__ import annotations

import base64
import time

import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailyard import keys
from mailyard.errors import SiteError
from mailyard.org import DkimKey
from mailyard.orgstore import read_org
from mailyard.redisconn import text_map

KEY_BITS = 2048


def txt_name(key: DkimKey) -> str:
    return f"{key.selector}._domainkey.{key.domain}"


def txt_value(key: DkimKey) -> str:
    """The record to publish: ``v=DKIM1; k=rsa; p=<the public key, DER, base64>``."""
    private = serialization.load_pem_private_key(key.private_key.encode(), password=None)
    der = private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def new_key(r: redis.Redis, domain: str, selector: str | None = None, now: float | None = None) -> DkimKey:
    """A new key for an accepted domain (it replaces the one there was: publish its record
    before the next EdgeSync, or signatures fail to verify meanwhile)."""
    _, org = read_org(r)
    if domain not in org.accepted_domains:
        raise SiteError(f"{domain} is not an accepted domain of the organization "
                        f"({', '.join(org.accepted_domains)})")
    now = time.time() if now is None else now
    selector = selector or time.strftime("my%Y%m", time.gmtime(now))
    private = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    key = DkimKey(domain=domain, selector=selector, private_key=pem, created=now)
    r.hset(keys.DKIM_KEYS, domain, key.model_dump_json())
    return key


def all_keys(r: redis.Redis) -> list[DkimKey]:
    return [DkimKey.model_validate_json(v) for _, v in sorted(text_map(r.hgetall(keys.DKIM_KEYS)).items())]


def remove_key(r: redis.Redis, domain: str) -> None:
    if not r.hdel(keys.DKIM_KEYS, domain):
        raise SiteError(f"{domain} has no DKIM key (`mailyard org dkim list`)")
