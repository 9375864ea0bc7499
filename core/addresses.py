"""E-mail addresses as the organization and the transport compare them, internationalized
addresses (RFC 6530, 6531, 6532) included.

One canonical form, used wherever addresses are compared, stored or looked up:

- the local part lower-cased (Exchange matches addresses without regard to case) and, when
  it is not ASCII, in Unicode NFC (RFC 6532 §3.1); its characters are RFC 5322's atext plus
  any non-ASCII letter, mark, number, symbol or punctuation: never a control, a format
  character (bidirectional overrides, zero-width joiners: they make one address look like
  another), a space, a private-use or unassigned code point, or invalid UTF-8;
- the domain lower-cased and, when it is an IDN, as U-labels (``bücher.example``), the form
  people write. An A-label (``xn--bcher-kva.example``) is taken too and turned into its
  U-labels, so both spellings name the same domain. IDNA 2008 with UTS #46 mapping (the
  ``idna`` package) decides what is a valid IDN.

``a_label`` gives the ASCII form that DNS and a peer without SMTPUTF8 need. An address
whose local part is ASCII can always go to such a peer (its domain as A-labels); one with a
non-ASCII local part needs SMTPUTF8 end to end (``needs_smtputf8``).
"""

from __future__ import annotations

import re
import unicodedata

import idna

_LABELS = r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+"
_ASCII_DOMAIN = re.compile(_LABELS + r"[a-z]{2,63}$")
_A_LABEL_DOMAIN = re.compile(_LABELS + r"(?:[a-z]{2,63}|xn--[a-z0-9-]{1,59})$")  # an IDN TLD allowed
_ATEXT = "a-z0-9!#$%&'*+/=?^_`{|}~-"
_LOCAL = re.compile(rf"^[{_ATEXT}]+(?:\.[{_ATEXT}]+)*$")
# Unicode categories a non-ASCII local part may not use (controls, format characters,
# surrogates, private use, unassigned; separators of every kind).
_FORBIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})
_MAX_LOCAL = 64  # octets, RFC 5321 4.5.3.1.1


def normalize_address(value: str) -> str:
    """The canonical form of ``local@domain``; ValueError if it is not a valid address."""
    if not isinstance(value, str):
        raise ValueError("expected an e-mail address")
    address = value.strip().lower()
    local, sep, domain = address.rpartition("@")
    if address.isascii() and "xn--" not in domain:  # nearly every address: no Unicode tables
        if sep and _LOCAL.match(local) and _ASCII_DOMAIN.match(domain):
            return address
        raise ValueError(f"{value!r} is not a valid e-mail address")
    try:
        if not sep:
            raise ValueError("no @")
        return f"{_local_part(local)}@{normalize_domain(domain)}"
    except ValueError:
        raise ValueError(f"{value!r} is not a valid e-mail address") from None


def _local_part(local: str) -> str:
    if local.isascii():
        if _LOCAL.match(local):
            return local
        raise ValueError("invalid local part")
    local = unicodedata.normalize("NFC", local)
    try:
        size = len(local.encode("utf-8"))
    except UnicodeEncodeError:  # a surrogate: bytes that were not UTF-8
        raise ValueError("invalid UTF-8") from None
    atoms = local.split(".")
    if size > _MAX_LOCAL or not all(atoms):
        raise ValueError("invalid local part")
    for ch in local:
        if ch.isascii():
            if ch != "." and not _LOCAL.match(ch):
                raise ValueError("invalid local part")
        elif unicodedata.category(ch) in _FORBIDDEN:
            raise ValueError(f"U+{ord(ch):04X} may not be part of an address")
    return local


def normalize_domain(value: str) -> str:
    """The canonical form of a domain name (lower case; an IDN as U-labels); ValueError if invalid."""
    if not isinstance(value, str):
        raise ValueError("expected a domain name")
    domain = value.strip().lower().rstrip(".")
    if domain.isascii() and "xn--" not in domain:
        if _ASCII_DOMAIN.match(domain):
            return domain
        raise ValueError(f"{value!r} is not a valid domain name")
    try:
        ascii_form = idna.encode(domain, uts46=True).decode("ascii")
        if not _A_LABEL_DOMAIN.match(ascii_form):
            raise ValueError("not a host name")
        return idna.decode(ascii_form)
    except (idna.IDNAError, UnicodeError, ValueError):
        raise ValueError(f"{value!r} is not a valid domain name") from None


def a_label(domain: str) -> str:
    """The ASCII (A-label) form of a canonical domain, for DNS and peers without SMTPUTF8."""
    return domain if domain.isascii() else idna.encode(domain).decode("ascii")


def ascii_address(address: str) -> str:
    """``address`` with its domain as A-labels (its local part must be ASCII)."""
    local, _, domain = address.rpartition("@")
    return f"{local}@{a_label(domain)}" if domain else address


def needs_smtputf8(address: str) -> bool:
    """Whether the address can travel only with SMTPUTF8: its local part is not ASCII."""
    return not address.rpartition("@")[0].isascii()


def canonical(address: str) -> str:
    """``normalize_address`` for a lookup: the address as given (lower-cased) if it is invalid."""
    lowered = address.lower()  # (not stripped: "alice@contoso.com " names no one)
    if (lowered.isascii() and "xn--" not in lowered) or lowered != lowered.strip():
        return lowered
    try:
        return normalize_address(lowered)
    except ValueError:
        return lowered
