"""Mailbox passwords, kept only as scrypt hashes.

A hash is one self-describing string, ``scrypt$<n>$<r>$<p>$<salt>$<key>`` (salt and key in
standard base64), made by ``hash_password`` with a random 16-byte salt of its own and
scrypt's interactive-logon parameters (n = 2**14, r = 8, p = 1: 16 MiB of memory; about 55 ms
of CPU on the machines Mailyard is tested on). ``verify`` reads the parameters from the hash,
so hashes made with other (stronger) parameters keep working, and compares in constant time.

Hubs verify on every SMTP logon, and most logons repeat the same password: a successful
verification is remembered (``verify``'s cache), so a client that logs on again costs an HMAC,
not another scrypt. The cache is keyed by an HMAC of the hash and the password under a key
made for this process, so it holds nothing that could be tried against passwords elsewhere;
failures are never cached, and a new hash (a changed password) is a new key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

SCHEME = "scrypt"
N, R, P = 2**14, 8, 1
SALT_BYTES = 16
KEY_BYTES = 32

# What a hash may ask of the verifier (a hash in the organization file is read by every hub):
# at most 128 MiB of memory (n * r * 128 bytes), n a power of two.
MAX_MEMORY = 128 * 1024 * 1024
MAX_R, MAX_P = 32, 16
MIN_SALT_BYTES, MIN_KEY_BYTES, MAX_KEY_BYTES = 8, 16, 64

CACHE_SIZE = 4096  # successful verifications remembered (LRU)

# Other schemes' hashes (bcrypt, argon2, crypt(3)'s SHA-512, PBKDF2...): refused rather than
# taken for a password that happens to look like one.
_FOREIGN = re.compile(r"^\$(2[abxy]?|argon2(id|i|d)|scrypt|pbkdf2[-\w]*|[156y]|7)\$")
_B64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


@dataclass(frozen=True)
class Params:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes


def hash_password(password: str | bytes) -> str:
    """A new hash of ``password`` (its UTF-8 bytes), with a random salt."""
    secret = password.encode() if isinstance(password, str) else password
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(secret, salt, N, R, P, KEY_BYTES)
    encoded = f"{SCHEME}${N}${R}${P}${_b64(salt)}${_b64(key)}"
    _remember(_cache_key(encoded, secret))  # who hashed it may verify it at once
    return encoded


def is_hash(value: str) -> bool:
    """True for a value meant as a hash (``scrypt$...``, or another scheme's), well formed or not."""
    return value.startswith(f"{SCHEME}$") or bool(_FOREIGN.match(value))


def parse(encoded: str) -> Params:
    """The parameters of a hash; ValueError saying what is wrong (never quoting the hash)."""
    if _FOREIGN.match(encoded):
        raise ValueError("is a password hash of a scheme Mailyard does not use: give the password, "
                         "or a hash made by `mailyard org hash-password` (scrypt$...)")
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise ValueError("is not a valid password hash: expected scrypt$N$R$P$SALT$KEY, "
                         "as `mailyard org hash-password` prints it")
    if not all(x.isascii() and x.isdigit() and len(x) <= 10 for x in parts[1:4]):
        raise ValueError("is not a valid password hash: N, R and P must be whole numbers")
    n, r, p = (int(x) for x in parts[1:4])
    if n < 2 or n & (n - 1) or not 1 <= r <= MAX_R or not 1 <= p <= MAX_P or 128 * n * r > MAX_MEMORY:
        raise ValueError(f"is not a valid password hash: scrypt parameters out of range (N a power of two, "
                         f"N * R * 128 at most {MAX_MEMORY // 2**20} MiB, R <= {MAX_R}, P <= {MAX_P})")
    salt, key = _unb64(parts[4]), _unb64(parts[5])
    if salt is None or key is None:
        raise ValueError("is not a valid password hash: the salt and the key must be base64")
    if len(salt) < MIN_SALT_BYTES or not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"is not a valid password hash: the salt must have at least {MIN_SALT_BYTES} bytes "
                         f"and the key {MIN_KEY_BYTES} to {MAX_KEY_BYTES}")
    return Params(n, r, p, salt, key)


def check(value: str) -> str:
    """A plain password or a well-formed hash, as the organization file may hold it."""
    if is_hash(value):
        parse(value)
    return value


def verify(password: str | bytes, encoded: str) -> bool:
    """True if ``password`` is the one ``encoded`` was made from. A value that is not a valid
    hash (a password kept in clear, say) verifies nothing."""
    secret = password.encode() if isinstance(password, str) else password
    if not encoded.startswith(f"{SCHEME}$"):
        return False
    cache_key = _cache_key(encoded, secret)
    with _lock:
        if cache_key in _cache:
            _cache.move_to_end(cache_key)
            return True
    try:
        params = parse(encoded)
    except ValueError:
        return False
    key = _scrypt(secret, params.salt, params.n, params.r, params.p, len(params.key))
    if not hmac.compare_digest(key, params.key):
        return False
    _remember(cache_key)
    return True


def verified_before(password: str | bytes, encoded: str) -> bool:
    """True if this password verified against ``encoded`` recently (no scrypt needed)."""
    secret = password.encode() if isinstance(password, str) else password
    with _lock:
        return _cache_key(encoded, secret) in _cache


def verify_nothing(password: str | bytes) -> None:
    """Spend what a verification costs, for a logon that names no one: the answer then takes
    as long as for a wrong password, and does not tell who exists."""
    global _decoy
    if _decoy is None:
        _decoy = hash_password(secrets.token_urlsafe(16))
    verify(password, _decoy)


_decoy: str | None = None


def forget() -> None:
    """Empty the cache of successful verifications (for measurements and tests)."""
    with _lock:
        _cache.clear()


# region: internals

_lock = threading.Lock()
_cache: OrderedDict[bytes, None] = OrderedDict()
_CACHE_SECRET = secrets.token_bytes(32)  # this process's; never leaves it


def _cache_key(encoded: str, secret: bytes) -> bytes:
    return hmac.new(_CACHE_SECRET, encoded.encode() + b"\0" + secret, hashlib.sha256).digest()


def _remember(cache_key: bytes) -> None:
    with _lock:
        _cache[cache_key] = None
        _cache.move_to_end(cache_key)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)


def _scrypt(secret: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    maxmem = 128 * r * (n + p + 2) + 1024 * 1024
    return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, dklen=length, maxmem=maxmem)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes | None:
    if not _B64.match(text):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


# endregion
