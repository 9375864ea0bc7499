"""Sender authentication on an Edge, at the end of DATA (Exchange's Sender ID agent, done as
2026 wants it): SPF (RFC 7208, pyspf) on MAIL FROM (on HELO for the null sender), DKIM
(RFC 6376, dkimpy) on every signature, and DMARC (RFC 7489) on the From domain, whose
organizational domain comes from the Public Suffix List (publicsuffixlist). The results go
into an ``Authentication-Results`` header (RFC 8601) with the Edge's FQDN as authserv-id; one
that arrives with that authserv-id is removed first (anyone may write one).

What is done with a failure is the operator's (``[antispam]``): ``spf_fail_action``
(``StampStatus``, Exchange's default, or ``Reject``), ``dmarc_enforce`` (a ``p=reject``
policy refuses the message). All DNS goes to the transport's ``dns_servers``.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

import dkim
import dns.exception
import dns.resolver
import spf
from publicsuffixlist import PublicSuffixList

from mailyard import headers

MAX_SIGNATURES = 5  # verified per message (each one parses the whole message again)
SPF_REJECT = "550 5.7.23 SPF validation failed: {0} does not permit {1} to send its mail"  # RFC 7372
DMARC_REJECT = "550 5.7.1 Unauthenticated email from {0} is not accepted due to its domain's DMARC policy"

_psl: PublicSuffixList | None = None
_psl_lock = threading.Lock()


def org_domain(domain: str) -> str:
    """The organizational domain (RFC 7489 3.2): one label below the public suffix."""
    global _psl
    with _psl_lock:
        if _psl is None:
            _psl = PublicSuffixList()
    return _psl.privatesuffix(domain) or domain


@dataclass
class Results:
    spf: str  # pass fail softfail neutral none temperror permerror
    spf_identity: str  # what SPF checked: the MAIL FROM address, or postmaster@<helo>
    dkim: list[tuple[str, str]] = field(default_factory=list)  # (result, d=) per signature
    dmarc: str = "none"  # pass fail none temperror permerror
    from_domain: str = ""
    policy: str = ""  # the DMARC policy that applies (none quarantine reject), "" without one

    @property
    def dkim_passed(self) -> list[str]:
        return [d for result, d in self.dkim if result == "pass"]

    def header(self, authserv_id: str) -> str:
        """The header; every value a sender chose (a d= tag, a From domain) is written only if
        it is a domain name, else ``unknown``: nothing of theirs can add a result."""
        local, _, domain = self.spf_identity.rpartition("@")
        mailfrom = f"{_safe_local(local)}@{_safe(domain)}" if local else _safe(domain)
        parts = [f"spf={self.spf} smtp.mailfrom={mailfrom}"]
        parts += [f"dkim={result} header.d={_safe(d)}" for result, d in self.dkim] or ["dkim=none"]
        dmarc = f"dmarc={self.dmarc}" + (f" (p={self.policy})" if self.policy else "")
        parts.append(f"{dmarc} header.from={_safe(self.from_domain) if self.from_domain else 'none'}")
        return f"Authentication-Results: {authserv_id};\r\n\t" + ";\r\n\t".join(parts)


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")
_LOCAL = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")


def _safe(domain: str) -> str:
    return domain if _DOMAIN.match(domain) else "unknown"


def _safe_local(local: str) -> str:
    return local if _LOCAL.match(local) else "unknown"


def authserv_id_of(value: str) -> str:
    """An Authentication-Results value's authserv-id (RFC 8601 2.2): comments and quotes
    around it removed, lower case; "" if there is none."""
    text = value
    while True:  # (nested comments: innermost first)
        stripped = re.sub(r"\([^()]*\)", " ", text)
        if stripped == text:
            break
        text = stripped
    first = text.split(";", 1)[0].strip().strip('"').strip()
    return first.split()[0].lower() if first.split() else ""


def _txt(resolver: dns.resolver.Resolver, name: str) -> list[str] | None:
    """The TXT strings at ``name`` (joined per record); None when DNS failed (temperror)."""
    try:
        answer = resolver.resolve(name, "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException:
        return None
    return [b"".join(r.strings).decode("ascii", "replace") for r in answer]


def _spf_lookup(resolver: dns.resolver.Resolver) -> Any:
    """pyspf's DNSLookup, asked of ``resolver`` (pyspf's own asks the system's)."""
    def lookup(name: str, qtype: str, *_: Any, **__: Any) -> list[tuple[tuple[str, str], Any]]:
        try:
            answers = resolver.resolve(name, qtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            raise spf.TempError(f"DNS {exc}") from None
        out: list[tuple[tuple[str, str], Any]] = []
        for r in answers:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), r.address))
            elif qtype == "MX":
                out.append(((name, qtype), (r.preference, r.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), r.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), r.strings))
        return out
    return lookup


_spf_lock = threading.Lock()  # (pyspf looks its DNSLookup up as a module global)


def check_spf(resolver: dns.resolver.Resolver, ip: str, mail_from: str, helo: str) -> tuple[str, str]:
    identity = mail_from or f"postmaster@{helo}"
    with _spf_lock:
        spf.DNSLookup = _spf_lookup(resolver)
        result, _ = spf.check2(i=ip, s=identity, h=helo or "unknown")
    return result or "none", identity


def check_dkim(resolver: dns.resolver.Resolver, raw: bytes) -> list[tuple[str, str]]:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        found = _txt(resolver, name.decode().rstrip("."))
        if found is None:
            raise dns.exception.Timeout
        return found[0].encode() if found else b""

    signatures = [v for k, v in (headers.parse(raw).items()) if k.lower() == "dkim-signature"][:MAX_SIGNATURES]
    out = []
    for index in range(len(signatures)):
        domain = _tag(str(signatures[index]), "d")
        try:
            d = dkim.DKIM(raw)
            ok = d.verify(idx=index, dnsfunc=dnsfunc)
            result = "pass" if ok else "fail"
            domain = (d.signature_fields or {}).get(b"d", b"").decode("ascii", "replace") or domain
        except dns.exception.DNSException:
            result = "temperror"
        except Exception:  # (dkimpy raises what a malformed message makes it: permerror, never a crash)
            result = "permerror"
        out.append((result, domain or "unknown"))
    return out


def _tag(signature: str, name: str) -> str:
    m = re.search(rf"(?:^|;)\s*{name}\s*=\s*([^;\s]+)", signature)
    return m.group(1) if m else ""


def _dmarc_record(resolver: dns.resolver.Resolver, domain: str) -> tuple[dict[str, str] | None, bool]:
    """The DMARC record for ``domain`` (its own, else its organizational domain's, then
    ``sp`` applies), as tags; and whether it is the organizational domain's."""
    for name, inherited in ((domain, False), (org_domain(domain), True)):
        if inherited and name == domain:
            break
        found = _txt(resolver, f"_dmarc.{name}")
        if found is None:
            raise dns.exception.Timeout
        records = [r for r in found if r.replace(" ", "").lower().startswith("v=dmarc1")]
        if len(records) == 1:
            tags = {}
            for part in records[0].split(";"):
                key, sep, value = part.partition("=")
                if sep:
                    tags[key.strip().lower()] = value.strip().lower()
            return tags, inherited
    return None, False


def _aligned(domain: str, from_domain: str, mode: str) -> bool:
    domain = domain.lower().rstrip(".")
    if mode == "s":
        return domain == from_domain
    return org_domain(domain) == org_domain(from_domain)


def check_dmarc(resolver: dns.resolver.Resolver, results: Results) -> None:
    domain = results.from_domain
    if not domain:
        results.dmarc = "permerror" if results.from_domain == "" else "none"
        return
    try:
        record, inherited = _dmarc_record(resolver, domain)
    except dns.exception.DNSException:
        results.dmarc = "temperror"
        return
    if record is None:
        results.dmarc = "none"
        return
    policy = record.get("sp", record.get("p", "none")) if inherited else record.get("p", "none")
    results.policy = policy if policy in ("none", "quarantine", "reject") else "none"
    spf_domain = results.spf_identity.rpartition("@")[2]
    by_spf = results.spf == "pass" and _aligned(spf_domain, domain, record.get("aspf", "r"))
    by_dkim = any(_aligned(d, domain, record.get("adkim", "r")) for d in results.dkim_passed)
    results.dmarc = "pass" if by_spf or by_dkim else "fail"


def authenticate(resolver: dns.resolver.Resolver, raw: bytes, ip: str, mail_from: str, helo: str) -> Results:
    """SPF, DKIM and DMARC of one message as it arrived (before our own trace headers)."""
    spf_result, identity = check_spf(resolver, ip, mail_from, helo)
    results = Results(spf=spf_result, spf_identity=identity, dkim=check_dkim(resolver, raw))
    results.from_domain = headers.from_domain(raw) or ""
    check_dmarc(resolver, results)
    return results


def refusal(results: Results, *, spf_fail_action: str, dmarc_enforce: bool, ip: str) -> tuple[str, str] | None:
    """(the reply, why) when the settings refuse the message; None to take it."""
    if dmarc_enforce and results.dmarc == "fail" and results.policy == "reject":
        return (DMARC_REJECT.format(results.from_domain),
                f"DMARC fail for {results.from_domain} (p=reject; spf={results.spf}, dkim="
                f"{','.join(r for r, _ in results.dkim) or 'none'})")
    if spf_fail_action == "Reject" and results.spf == "fail":
        domain = results.spf_identity.rpartition("@")[2]
        return SPF_REJECT.format(domain, ip), f"SPF fail: {domain} does not permit {ip}"
    return None


def strip_results(raw: bytes, authserv_ids: set[str]) -> bytes:
    """``raw`` without the Authentication-Results fields whose authserv-id is one of ours."""
    if b"authentication-results" not in headers.split(raw)[0].lower():
        return raw
    ours = {a.lower().rstrip(".") for a in authserv_ids}
    return headers.strip_if(raw, "Authentication-Results", lambda value: authserv_id_of(value).rstrip(".") in ours)
