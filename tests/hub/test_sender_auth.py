"""Sender authentication (mailyard.hub.sender_auth): the header, DMARC's alignment and what the
settings refuse, removing results that claim to be ours; and, against the project's DNS server
(mailyard.internet.dns), DMARC over every From domain, its pct, the SCL a quarantine gets at the
end of DATA (mailyard.hub.antispam), and SPF checks that do not wait for one another."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dns.resolver
import pytest

from mailyard import headers
from mailyard.directory import Directory
from mailyard.hub import antispam, sender_auth
from mailyard.hub.sender_auth import DMARC_REJECT, Dmarc, Results
from mailyard.internet.dns import TXT, DnsServer, Zone
from mailyard.org import EdgeRole
from tests.conftest import make_org

IP = "192.0.2.1"  # the only address pass.example's SPF permits
MAIL_FROM = "a@pass.example"


def test_the_header_lists_each_method() -> None:
    results = Results(spf="pass", spf_identity="a@fabrikam.example", dkim=[("pass", "fabrikam.example")],
                      dmarc=[Dmarc("fabrikam.example", "pass", "reject")])
    assert results.header("edge.example") == (
        "Authentication-Results: edge.example;\r\n\tspf=pass smtp.mailfrom=a@fabrikam.example;\r\n\t"
        "dkim=pass header.d=fabrikam.example;\r\n\tdmarc=pass (p=reject) header.from=fabrikam.example")


def test_relaxed_alignment_is_by_organizational_domain() -> None:
    assert sender_auth._aligned("mail.fabrikam.example", "fabrikam.example", "r")
    assert not sender_auth._aligned("mail.fabrikam.example", "fabrikam.example", "s")
    assert not sender_auth._aligned("fabrikam.co.uk", "contoso.co.uk", "r"), "a public suffix is no organization"
    # (From domains are kept as A-labels; an SMTPUTF8 MAIL FROM or a d= may be written in U-labels)
    assert sender_auth._aligned("mail.bücher.example", "xn--bcher-kva.example", "r")
    assert sender_auth.from_domains(b"From: a@B\xc3\xbccher.example, b@xn--bcher-kva.example\r\n\r\n") == (
        ["xn--bcher-kva.example"], "")


def test_only_a_dmarc_reject_policy_or_spf_reject_refuses() -> None:
    failed = Results(spf="fail", spf_identity="x@fabrikam.example",
                     dmarc=[Dmarc("fabrikam.example", "fail", "reject", "reject")])
    assert sender_auth.refusal(failed, spf_fail_action="StampStatus", dmarc_enforce=True, ip="192.0.2.1")
    assert sender_auth.refusal(failed, spf_fail_action="StampStatus", dmarc_enforce=False, ip="192.0.2.1") is None
    quarantine = Results(spf="fail", spf_identity="x@fabrikam.example",
                         dmarc=[Dmarc("fabrikam.example", "fail", "quarantine", "quarantine")])
    assert sender_auth.refusal(quarantine, spf_fail_action="StampStatus", dmarc_enforce=True, ip="192.0.2.1") is None
    reply, _ = sender_auth.refusal(quarantine, spf_fail_action="Reject", dmarc_enforce=True, ip="192.0.2.1") or ("", "")
    assert reply.startswith("550 5.7.23 SPF validation failed: fabrikam.example does not permit 192.0.2.1")


def test_results_with_our_authserv_id_are_removed_and_others_kept() -> None:
    raw = (b"Authentication-Results: edge.example; dkim=pass\r\n header.d=paypal.example\r\n"
           b"Authentication-Results: mx.other.example; spf=pass\r\nSubject: hi\r\n\r\nbody\r\n")
    out = sender_auth.strip_results(raw, {"Edge.Example"})
    assert b"paypal" not in out and b"mx.other.example; spf=pass" in out and out.endswith(b"Subject: hi\r\n\r\nbody\r\n")


def test_what_a_sender_chose_goes_into_the_header_only_as_a_domain_name() -> None:
    results = Results(spf="none", spf_identity="x;dkim=pass@evil.example", dkim=[("fail", "evil; dkim=pass header.d=bank")],
                      dmarc=[Dmarc("[evil.com; dkim=pass header.d=bank.example]")])
    header = results.header("edge.example")
    assert header.count("dkim=") == 1 and "bank" not in header and "header.d=unknown" in header, header


def test_results_in_our_name_are_found_behind_comments_and_quotes() -> None:
    for value in (b"(a comment) edge.example; dkim=pass", b'"edge.example"; dkim=pass', b"Edge.Example.; dkim=pass"):
        raw = b"Authentication-Results: " + value + b"\r\nSubject: hi\r\n\r\nbody\r\n"
        assert b"dkim=pass" not in sender_auth.strip_results(raw, {"edge.example"}), value
    assert sender_auth.strip_results(b"Authentication-Results: ; x\r\n\r\n", {"edge.example"})  # (no crash)


def test_a_message_that_breaks_the_parsers_is_not_a_crash() -> None:
    assert headers.from_domain(b"From: " + b"(" * 3000 + b"\r\n\r\nbody\r\n") is None


ZONE = {
    "pass.example": [TXT(f"v=spf1 ip4:{IP} -all")],
    "_dmarc.pass.example": [TXT("v=DMARC1; p=reject")],
    "_dmarc.strict.example": [TXT("v=DMARC1; p=reject")],
    "_dmarc.lax.example": [TXT("v=DMARC1; p=none")],
    "_dmarc.junk.example": [TXT("v=DMARC1; p=quarantine")],
    "_dmarc.never.example": [TXT("v=DMARC1; p=reject; pct=0")],
    "_dmarc.always.example": [TXT("v=DMARC1; p=reject; pct=100")],
    "_dmarc.softly.example": [TXT("v=DMARC1; p=quarantine; pct=0")],
    "slow.example": [TXT("v=spf1 -all")],
}


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer(Zone(ZONE)) as running:
        yield running


def mail(*head: str) -> bytes:
    return "\r\n".join([*head, "To: bob@contoso.com", "Subject: hi", "", "hello", ""]).encode()


def authenticate(server: DnsServer, raw: bytes) -> Results:
    return sender_auth.authenticate(server.resolver(), raw, IP, MAIL_FROM, "mail.pass.example")


def refused(results: Results, *, dmarc_enforce: bool = True) -> str | None:
    found = sender_auth.refusal(results, spf_fail_action="StampStatus", dmarc_enforce=dmarc_enforce, ip=IP)
    return found[0] if found else None


def test_a_from_of_several_domains_fails_if_any_fails_and_the_strictest_policy_applies(server: DnsServer) -> None:
    results = authenticate(server, mail("From: a@pass.example, ceo@strict.example"))
    assert refused(results) == DMARC_REJECT.format("strict.example")
    header = results.header("edge.example")
    assert "dmarc=pass (p=reject) header.from=pass.example" in header, header
    assert "dmarc=fail (p=reject) header.from=strict.example" in header, header
    # (lax.example fails too, but publishes p=none: strict.example's reject stands)
    mixed = authenticate(server, mail("From: x@lax.example, y@strict.example, z@lax.example"))
    assert [d.domain for d in mixed.dmarc] == ["lax.example", "strict.example"]
    assert refused(mixed) == DMARC_REJECT.format("strict.example")
    # one domain written twice is judged once
    same = authenticate(server, mail("From: a@pass.example, Other <other@PASS.example>"))
    assert refused(same) is None and same.header("edge.example").count("dmarc=") == 1


@pytest.mark.parametrize(("head", "problem"), [
    ((), "missing"),
    (("From: undisclosed recipients",), "malformed"),
    (("From: a@[192.0.2.1]",), "malformed"),
    (("From: a@pass.example, nobody",), "malformed"),
    (("From: a@pass.example", "From: ceo@strict.example"), "repeated"),
])
def test_a_message_without_one_readable_from_is_a_permerror_refused_when_dmarc_is_enforced(
        server: DnsServer, head: tuple[str, ...], problem: str) -> None:
    results = authenticate(server, mail(*head))
    assert refused(results) == (f"550 5.7.1 The message's From header is {problem}: RFC 5322 requires exactly one, "
                                "with the author's address")
    assert f"dmarc=permerror (From header {problem}) header.from=none" in results.header("edge.example")
    assert refused(results, dmarc_enforce=False) is None


def test_pct_applies_the_policy_to_that_share_of_failing_mail_and_the_next_one_down_to_the_rest(
        server: DnsServer) -> None:
    never = authenticate(server, mail("From: ceo@never.example"))  # p=reject; pct=0
    assert refused(never) is None and sender_auth.quarantined(never, dmarc_enforce=True)
    assert "dmarc=fail (p=reject dis=quarantine) header.from=never.example" in never.header("edge.example")
    always = authenticate(server, mail("From: ceo@always.example"))  # p=reject; pct=100
    assert refused(always) == DMARC_REJECT.format("always.example")
    softly = authenticate(server, mail("From: ceo@softly.example"))  # p=quarantine; pct=0
    assert refused(softly) is None and not sender_auth.quarantined(softly, dmarc_enforce=True)
    assert "dmarc=fail (p=quarantine dis=none) header.from=softly.example" in softly.header("edge.example")
    junk = authenticate(server, mail("From: ceo@junk.example"))  # p=quarantine (pct=100)
    assert sender_auth.quarantined(junk, dmarc_enforce=True) and not sender_auth.quarantined(junk, dmarc_enforce=False)


@contextmanager
def rspamd_saying(action: str, score: float) -> Iterator[str]:
    """An HTTP endpoint that answers /checkv2 as rspamd would, with this action (the test
    cannot make a real rspamd give an exact score): its URL."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.dumps({"action": action, "score": score, "symbols": {}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{http.server_port}"
    finally:
        http.shutdown()
        http.server_close()


def end_of_data(server: DnsServer, raw: bytes, *, rspamd: str = "", junk_threshold: int = 4,
                **settings: Any) -> list[str]:
    """The header lines an Edge adds at the end of DATA (antispam.on_data, for real)."""
    org = make_org(dns_servers=[server.address], scl_junk_threshold=junk_threshold)
    org = org.model_copy(update={
        "antispam": org.antispam.model_copy(update={"content_filtering": bool(rspamd), **settings}),
        "edge": EdgeRole(name="EDGE-01", site="Amsterdam", rspamd=rspamd)})
    checked = asyncio.run(antispam.on_data(None, Directory(org), raw, IP, MAIL_FROM, "mail.pass.example",
                                           "edge.example", ["bob@contoso.com"], original=raw))
    assert not isinstance(checked, str), checked
    return [line for line in checked[1] if line.startswith("X-Mailyard-SCL")]


def test_a_dmarc_quarantine_stamps_an_scl_above_the_junk_threshold_without_content_filtering(
        server: DnsServer) -> None:
    assert end_of_data(server, mail("From: ceo@junk.example")) == ["X-Mailyard-SCL: 5"]
    assert end_of_data(server, mail("From: ceo@junk.example"), junk_threshold=6) == ["X-Mailyard-SCL: 7"]
    assert end_of_data(server, mail("From: ceo@junk.example"), junk_threshold=9) == ["X-Mailyard-SCL: 9"]
    assert end_of_data(server, mail("From: ceo@never.example")) == ["X-Mailyard-SCL: 5"], "reject lowered by pct"
    assert end_of_data(server, mail("From: a@pass.example")) == []
    assert end_of_data(server, mail("From: ceo@junk.example"), dmarc_enforce=False) == []


def test_the_scl_is_the_higher_of_rspamds_and_dmarcs(server: DnsServer) -> None:
    with rspamd_saying("no action", 0.5) as url:  # SCL 1
        assert end_of_data(server, mail("From: ceo@junk.example"), rspamd=url) == ["X-Mailyard-SCL: 5"]
        assert end_of_data(server, mail("From: a@pass.example"), rspamd=url) == ["X-Mailyard-SCL: 1"]
    with rspamd_saying("soft reject", 9.0) as url:  # SCL 6
        assert end_of_data(server, mail("From: ceo@junk.example"), rspamd=url) == ["X-Mailyard-SCL: 6"]


class StallingResolver(dns.resolver.Resolver):
    """The project's DNS server, where a lookup of ``name`` waits for ``release`` first (an
    attacker's name server that answers slowly)."""

    def __init__(self, server: DnsServer, name: str) -> None:
        super().__init__(configure=False)
        self.nameservers = [server.host]
        self.port = server.port
        self.stalled_name = name
        self.asked, self.release = threading.Event(), threading.Event()

    def resolve(self, qname: Any, *args: Any, **kwargs: Any) -> dns.resolver.Answer:
        if str(qname).rstrip(".").lower() == self.stalled_name:
            self.asked.set()
            self.release.wait(30)
        return super().resolve(qname, *args, **kwargs)


def test_an_spf_check_whose_dns_is_slow_holds_up_no_other_check(server: DnsServer) -> None:
    slow = StallingResolver(server, "slow.example")
    found: dict[str, str] = {}

    def check(key: str, resolver: dns.resolver.Resolver, sender: str) -> None:
        found[key] = sender_auth.check_spf(resolver, IP, sender, "mail.example")[0]

    stalled = threading.Thread(target=check, args=("slow", slow, "x@slow.example"), daemon=True)
    stalled.start()
    try:
        assert slow.asked.wait(10), "the first check did not ask for slow.example"
        quick = threading.Thread(target=check, args=("quick", server.resolver(), MAIL_FROM), daemon=True)
        quick.start()
        quick.join(10)
        assert found.get("quick") == "pass", "the second check waited for the first one's DNS"
        assert stalled.is_alive() and "slow" not in found
    finally:
        slow.release.set()
        stalled.join(10)
    assert found["slow"] == "fail", "each check asked its own resolver (slow.example: -all)"
