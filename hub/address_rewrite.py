"""Address rewriting on an Edge (Exchange's Address Rewriting agents; reference §3).

Outbound, on what the organization sends to the Internet (``send``: per message, before DKIM
signs it, so the signature covers the rewritten From and is made with the external domain's
key): the envelope sender and the sender fields of the header (From, Sender, Reply-To,
Return-Receipt-To, Disposition-Notification-To, Resent-From, Resent-Sender). Inbound, on mail
from the Internet, for entries that are not ``outbound_only``: each RCPT TO before recipient
filtering judges it (``receive_handler``), then To and Cc at the end of DATA.

An entry for one address wins over one for its domain, which wins over a ``*.domain`` entry
(its subdomains, less its exception list). Only the address is replaced in a field: the
display name, comments and folding stay as they came. A field that a DKIM signature of the
message covers (``h=``) is left alone, as is the header of an S/MIME or OpenPGP message:
rewriting them would break a signature someone else made. The envelope is rewritten anyway
(it is not signed), and internal DSNs still go to the internal sender (the message's record
keeps it; only what goes on the wire changes).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from mailyard import headers
from mailyard.addresses import canonical
from mailyard.org import AddressRewrite

OUTBOUND_FIELDS = ("From", "Sender", "Reply-To", "Return-Receipt-To", "Disposition-Notification-To",
                   "Resent-From", "Resent-Sender")
INBOUND_FIELDS = ("To", "Cc")
# A top-level type whose signature or encryption covers more than the body
_SECURED = re.compile(rb"^content-type[ \t]*:[ \t]*(multipart/(signed|encrypted)|application/(x-)?pkcs7-mime)",
                      re.IGNORECASE | re.MULTILINE)
_DKIM_H = re.compile(rb"(?:^|;)\s*h\s*=\s*([^;]*)", re.IGNORECASE)


def outbound(entries: Sequence[AddressRewrite], address: str) -> str:
    """The external form of ``address`` (as given when no entry applies)."""
    local, at, domain = canonical(address).rpartition("@")
    if not at:
        return address
    address_entry = (e.external_address for e in entries if e.is_address and e.internal_address == f"{local}@{domain}")
    if found := next(address_entry, None):
        return found
    domain_entry = (e.external_address for e in entries if e.internal_address == domain)
    wildcard = (e.external_address for e in entries
                if e.wildcard and domain.endswith(e.internal_address[1:]) and domain not in e.exception_list)
    found = next(domain_entry, None) or next(wildcard, None)
    return f"{local}@{found}" if found else address


def inbound(entries: Sequence[AddressRewrite], address: str) -> str:
    """The internal form of ``address`` by the entries that rewrite inbound (as given if none)."""
    local, at, domain = canonical(address).rpartition("@")
    if not at:
        return address
    both = [e for e in entries if not e.outbound_only]
    address_entry = (e.internal_address for e in both if e.is_address and e.external_address == f"{local}@{domain}")
    if found := next(address_entry, None):
        return found
    found = next((e.internal_address for e in both if not e.is_address and e.external_address == domain), None)
    return f"{local}@{found}" if found else address


def rewrites_inbound(entries: Sequence[AddressRewrite]) -> bool:
    return any(not e.outbound_only for e in entries)


def outbound_message(entries: Sequence[AddressRewrite], sender: str, raw: bytes) -> tuple[str, bytes]:
    """The envelope sender and the message as they leave for the Internet."""
    if not entries:
        return sender, raw
    return (outbound(entries, sender) if sender else sender,
            rewrite_fields(raw, OUTBOUND_FIELDS, lambda a: outbound(entries, a)))


def inbound_message(entries: Sequence[AddressRewrite], raw: bytes) -> bytes:
    """The message as it comes in from the Internet, its To and Cc rewritten."""
    if not rewrites_inbound(entries):
        return raw
    return rewrite_fields(raw, INBOUND_FIELDS, lambda a: inbound(entries, a))


def rewrite_fields(raw: bytes, fields: Sequence[str], rewrite: Callable[[str], str]) -> bytes:
    """``raw`` with the addresses of ``fields`` replaced by ``rewrite``'s answer, byte for byte
    in place; a field a DKIM signature covers, and every field of a secured message, as it was."""
    head, rest = headers.split(raw)
    if _SECURED.search(head):
        return raw
    wanted = {f.lower() for f in fields} - _dkim_signed(head)
    if not wanted:
        return raw
    out: list[bytes] = []
    changed = False
    for lines in headers.fields(head):
        name = lines[0].split(b":", 1)[0].strip().lower().decode("ascii", "replace")
        field = b"".join(lines)
        if name in wanted:
            new = _rewrite_field(field, rewrite)
            changed = changed or new != field
            field = new
        out.append(field)
    return b"".join(out) + rest if changed else raw


def _rewrite_field(field: bytes, rewrite: Callable[[str], str]) -> bytes:
    name, _, value = field.partition(b":")
    try:
        found = headers.addresses(headers.parse(b"X: " + b" ".join(value.split()) + b"\r\n\r\n"), "X")
    except ValueError:
        return field  # (unreadable: left as it came)
    for _, address in found:
        if "@" not in address:
            continue
        new = rewrite(address)
        if canonical(new) == canonical(address):
            continue
        pattern = re.compile(rb"(?<![\w.!#$%&'*+/=?^`{|}~-])" + re.escape(address.encode("utf-8", "surrogateescape"))
                             + rb"(?![\w-]|\.\w)", re.IGNORECASE)
        value = pattern.sub(new.encode("utf-8").replace(b"\\", b"\\\\"), value)
    return name + b":" + value


def _dkim_signed(head: bytes) -> set[str]:
    """The fields a DKIM-Signature of the header block signs."""
    signed: set[str] = set()
    for lines in headers.fields(head):
        name, _, value = b"".join(lines).partition(b":")
        if name.strip().lower() == b"dkim-signature" and (m := _DKIM_H.search(b"".join(value.split()))):
            signed.update(n.strip().lower().decode("ascii", "replace") for n in m.group(1).split(b":"))
    return signed

