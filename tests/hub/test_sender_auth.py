"""Sender authentication's rules (mailyard.hub.sender_auth) that need no DNS: the header,
DMARC's alignment and what the settings refuse, and removing results that claim to be ours."""

from __future__ import annotations

from mailyard import headers
from mailyard.hub import sender_auth
from mailyard.hub.sender_auth import Results


def test_the_header_lists_each_method() -> None:
    results = Results(spf="pass", spf_identity="a@fabrikam.example", dkim=[("pass", "fabrikam.example")],
                      dmarc="pass", from_domain="fabrikam.example", policy="reject")
    assert results.header("edge.example") == (
        "Authentication-Results: edge.example;\r\n\tspf=pass smtp.mailfrom=a@fabrikam.example;\r\n\t"
        "dkim=pass header.d=fabrikam.example;\r\n\tdmarc=pass (p=reject) header.from=fabrikam.example")


def test_relaxed_alignment_is_by_organizational_domain() -> None:
    assert sender_auth._aligned("mail.fabrikam.example", "fabrikam.example", "r")
    assert not sender_auth._aligned("mail.fabrikam.example", "fabrikam.example", "s")
    assert not sender_auth._aligned("fabrikam.co.uk", "contoso.co.uk", "r"), "a public suffix is no organization"


def test_only_a_dmarc_reject_policy_or_spf_reject_refuses() -> None:
    failed = Results(spf="fail", spf_identity="x@fabrikam.example", dmarc="fail", from_domain="fabrikam.example",
                     policy="reject")
    assert sender_auth.refusal(failed, spf_fail_action="StampStatus", dmarc_enforce=True, ip="192.0.2.1")
    assert sender_auth.refusal(failed, spf_fail_action="StampStatus", dmarc_enforce=False, ip="192.0.2.1") is None
    quarantine = Results(spf="fail", spf_identity="x@fabrikam.example", dmarc="fail", from_domain="fabrikam.example",
                         policy="quarantine")
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
                      dmarc="none", from_domain="[evil.com; dkim=pass header.d=bank.example]")
    header = results.header("edge.example")
    assert header.count("dkim=") == 1 and "bank" not in header and "header.d=unknown" in header, header


def test_results_in_our_name_are_found_behind_comments_and_quotes() -> None:
    for value in (b"(a comment) edge.example; dkim=pass", b'"edge.example"; dkim=pass', b"Edge.Example.; dkim=pass"):
        raw = b"Authentication-Results: " + value + b"\r\nSubject: hi\r\n\r\nbody\r\n"
        assert b"dkim=pass" not in sender_auth.strip_results(raw, {"edge.example"}), value
    assert sender_auth.strip_results(b"Authentication-Results: ; x\r\n\r\n", {"edge.example"})  # (no crash)


def test_a_message_that_breaks_the_parsers_is_not_a_crash() -> None:
    assert headers.from_domain(b"From: " + b"(" * 3000 + b"\r\n\r\nbody\r\n") is None
