"""Sender authentication on an Edge, at the end of DATA (Exchange's Sender ID agent, done as
2026 wants it): SPF (RFC 7208, pyspf) on MAIL FROM (on HELO for the null sender), DKIM
(RFC 6376, dkimpy) on every signature, and DMARC (RFC 7489) on the From domain, whose
organizational domain comes from the Public Suffix List (publicsuffixlist). The results go
into an ``Authentication-Results`` header (RFC 8601) with the Edge's FQDN as authserv-id; one
that arrives with that authserv-id is removed first (anyone may write one).

DMARC judges the From header, which RFC 5322 requires exactly once:

- a From naming several authors (RFC 5322 allows it, with a Sender) is judged per distinct
  domain, and the strictest outcome stands (RFC 7489 6.6.1): a fail of any domain fails the
  message, with the strictest policy among the failing domains; the header has a result each;
- no From header, more than one, or one without a readable address and a valid domain is
  ``dmarc=permerror``, and refused (``550 5.7.1``, naming the From header) when
  ``dmarc_enforce`` is on: there is no author to judge, and a spoofer would choose one;
- a policy's ``pct`` (RFC 7489 6.6.4) applies it to that share of failing messages, drawn at
  random; the others get the next policy down (reject: quarantine; quarantine: none). The
  header says ``(p=reject dis=quarantine)`` when the draw lowered it.

What is done with a failure is the operator's (``[antispam]``): ``spf_fail_action``
(``StampStatus``, Exchange's default, or ``Reject``), ``dmarc_enforce`` (a ``reject``
disposition refuses the message, a ``quarantine`` one sends it to Junk Email: mailyard.hub.
antispam stamps an SCL above the organization's junk threshold; off, DMARC is only stamped).
All DNS goes to the transport's ``dns_servers``. pyspf asks a module global for DNS: it is
set once to a dispatcher that finds each check's resolver in that check's own context
(a ContextVar), so concurrent checks neither wait for one another nor share a resolver.
"""

from __future__ import annotations

import random
import re
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import dkim
import dns.exception
import dns.resolver
import spf
from publicsuffixlist import PublicSuffixList

from mailyard import headers
from mailyard.addresses import a_label, normalize_domain

MAX_SIGNATURES = 5  # verified per message (each one parses the whole message again)
SPF_REJECT = "550 5.7.23 SPF validation failed: {0} does not permit {1} to send its mail"  # RFC 7372
DMARC_REJECT = "550 5.7.1 Unauthenticated email from {0} is not accepted due to its domain's DMARC policy"
FROM_REFUSED = "550 5.7.1 The message's From header is {0}: RFC 5322 requires exactly one, with the author's address"
POLICIES = ("none", "quarantine", "reject")  # from the weakest
_RANK = {"fail": 4, "temperror": 3, "permerror": 2, "pass": 1, "none": 0}  # DMARC results: higher, stricter

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
class Dmarc:
    """DMARC's result for one From domain."""

    domain: str  # as DNS has it (A-labels)
    result: str = "none"  # pass fail none temperror permerror
    policy: str = ""  # the policy the domain publishes for it (p, or sp for a subdomain); "" without one
    disposition: str = ""  # what a fail gets after pct's draw (none quarantine reject); "" unless a fail

    def header_part(self) -> str:
        shown = f"p={self.policy}" + (f" dis={self.disposition}" if self.disposition not in ("", self.policy) else "")
        return f"dmarc={self.result}" + (f" ({shown})" if self.policy else "") + f" header.from={_safe(self.domain)}"


@dataclass
class Results:
    spf: str  # pass fail softfail neutral none temperror permerror
    spf_identity: str  # what SPF checked: the MAIL FROM address, or postmaster@<helo>
    dkim: list[tuple[str, str]] = field(default_factory=list)  # (result, d=) per signature
    dmarc: list[Dmarc] = field(default_factory=list)  # one per distinct From domain
    from_problem: str = ""  # why the From header names no domain to judge (missing malformed repeated)

    @property
    def dkim_passed(self) -> list[str]:
        return [d for result, d in self.dkim if result == "pass"]

    @property
    def verdict(self) -> Dmarc:
        """The DMARC result that stands for the message: the strictest of its From domains'."""
        if not self.dmarc:
            return Dmarc("", "permerror" if self.from_problem else "none")
        return max(self.dmarc, key=lambda d: (_RANK.get(d.result, 0), _strictness(d.disposition)))

    def header(self, authserv_id: str) -> str:
        """The header; every value a sender chose (a d= tag, a From domain) is written only if
        it is a domain name, else ``unknown``: nothing of theirs can add a result."""
        local, _, domain = self.spf_identity.rpartition("@")
        mailfrom = f"{_safe_local(local)}@{_safe(domain)}" if local else _safe(domain)
        parts = [f"spf={self.spf} smtp.mailfrom={mailfrom}"]
        parts += [f"dkim={result} header.d={_safe(d)}" for result, d in self.dkim] or ["dkim=none"]
        if self.dmarc:
            parts += [d.header_part() for d in self.dmarc]
        else:  # (from_problem is one of ours: a word, never the sender's text)
            parts.append(f"dmarc={self.verdict.result}" + (f" (From header {self.from_problem})"
                                                              if self.from_problem else "") + " header.from=none")
        return f"Authentication-Results: {authserv_id};\r\n\t" + ";\r\n\t".join(parts)


def _strictness(policy: str) -> int:
    return POLICIES.index(policy) if policy in POLICIES else -1


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


def _spf_lookup(resolver: dns.resolver.Resolver, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
    """pyspf's DNSLookup, asked of ``resolver`` (pyspf's own asks the system's)."""
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


# pyspf's query.dns calls the module global spf.DNSLookup(name, qtype, strict, timeout), which
# knows nothing of the query: one dispatcher, installed once, finds the resolver this check set
# in its own context (each thread has its own), where a global set per check needed a lock that
# made every session wait for the slowest sender's DNS.
_spf_resolver: ContextVar[dns.resolver.Resolver | None] = ContextVar("spf_resolver", default=None)
_pyspf_lookup = spf.DNSLookup


def _dispatch(name: str, qtype: str, *args: Any, **kwargs: Any) -> Any:
    resolver = _spf_resolver.get()
    if resolver is None:  # (pyspf used outside check_spf: its own lookup, as before we came)
        return _pyspf_lookup(name, qtype, *args, **kwargs)
    return _spf_lookup(resolver, name, qtype)


spf.DNSLookup = _dispatch


def check_spf(resolver: dns.resolver.Resolver, ip: str, mail_from: str, helo: str) -> tuple[str, str]:
    identity = mail_from or f"postmaster@{helo}"
    token = _spf_resolver.set(resolver)
    try:
        result, _ = spf.check2(i=ip, s=identity, h=helo or "unknown")
    finally:
        _spf_resolver.reset(token)
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


def _dns_form(domain: str) -> str:
    """A domain as A-labels, as From domains are kept (an SMTPUTF8 MAIL FROM has U-labels)."""
    try:
        return a_label(normalize_domain(domain))
    except ValueError:
        return domain.lower().rstrip(".")


def _aligned(domain: str, from_domain: str, mode: str) -> bool:
    domain = _dns_form(domain)
    if mode == "s":
        return domain == from_domain
    return org_domain(domain) == org_domain(from_domain)


def from_domains(raw: bytes) -> tuple[list[str], str]:
    """The distinct domains (A-labels, in order) of the From header's addresses; or none and
    why: "missing", "repeated" (RFC 5322 3.6 allows one From field), "malformed" (an address
    that does not parse, or has no valid domain: one bad address spoils the field)."""
    head = headers.parse(raw)
    count = len(head.get_all("From") or [])
    if count != 1:
        return [], "missing" if count == 0 else "repeated"
    try:
        addresses = [address for _, address in headers.addresses(head, "From")]
        domains = [a_label(normalize_domain(address.rpartition("@")[2])) for address in addresses if "@" in address]
    except ValueError:  # (IDNA's errors among them)
        return [], "malformed"
    if not domains or len(domains) != len(addresses):
        return [], "malformed"
    return list(dict.fromkeys(domains)), ""


def _disposition(policy: str, record: dict[str, str]) -> str:
    """What a failing message gets: the policy for pct percent of them, drawn at random (RFC
    7489 6.6.4), and the next one down for the others. A pct that is not 0-100 counts as 100."""
    pct = record.get("pct", "100")
    share = int(pct) if pct.isdigit() and int(pct) <= 100 else 100
    if random.randrange(100) < share:
        return policy
    return POLICIES[max(POLICIES.index(policy) - 1, 0)]


def check_dmarc(resolver: dns.resolver.Resolver, results: Results, domain: str) -> Dmarc:
    """DMARC for one From domain, by the SPF and DKIM results already in ``results``."""
    try:
        record, inherited = _dmarc_record(resolver, domain)
    except dns.exception.DNSException:
        return Dmarc(domain, "temperror")
    if record is None:
        return Dmarc(domain, "none")
    policy = record.get("sp", record.get("p", "none")) if inherited else record.get("p", "none")
    policy = policy if policy in POLICIES else "none"
    spf_domain = results.spf_identity.rpartition("@")[2]
    by_spf = results.spf == "pass" and _aligned(spf_domain, domain, record.get("aspf", "r"))
    by_dkim = any(_aligned(d, domain, record.get("adkim", "r")) for d in results.dkim_passed)
    if by_spf or by_dkim:
        return Dmarc(domain, "pass", policy)
    return Dmarc(domain, "fail", policy, _disposition(policy, record))


def authenticate(resolver: dns.resolver.Resolver, raw: bytes, ip: str, mail_from: str, helo: str) -> Results:
    """SPF, DKIM and DMARC of one message as it arrived (before our own trace headers)."""
    spf_result, identity = check_spf(resolver, ip, mail_from, helo)
    results = Results(spf=spf_result, spf_identity=identity, dkim=check_dkim(resolver, raw))
    domains, results.from_problem = from_domains(raw)
    results.dmarc = [check_dmarc(resolver, results, domain) for domain in domains]
    return results


def quarantined(results: Results, *, dmarc_enforce: bool) -> bool:
    """Does DMARC send this message to Junk Email? A fail whose disposition is quarantine
    (published so, or a reject that pct lowered), when the operator enforces DMARC."""
    verdict = results.verdict
    return dmarc_enforce and verdict.result == "fail" and verdict.disposition == "quarantine"


def refusal(results: Results, *, spf_fail_action: str, dmarc_enforce: bool, ip: str) -> tuple[str, str] | None:
    """(the reply, why) when the settings refuse the message; None to take it."""
    verdict = results.verdict
    if dmarc_enforce and results.from_problem:
        return FROM_REFUSED.format(results.from_problem), f"DMARC permerror: the From header is {results.from_problem}"
    if dmarc_enforce and verdict.result == "fail" and verdict.disposition == "reject":
        return (DMARC_REJECT.format(verdict.domain),
                f"DMARC fail for {verdict.domain} (p=reject; spf={results.spf}, dkim="
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
