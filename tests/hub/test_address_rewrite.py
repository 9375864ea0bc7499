"""Address rewriting on an Edge (Exchange's New-AddressRewriteEntry): which address becomes
which, outbound and inbound, and what in a message is rewritten and what is left alone."""

from __future__ import annotations

import base64

import dkim
import pytest

from mailyard.hub import address_rewrite
from mailyard.org import AddressRewrite

ENTRIES = [
    AddressRewrite(name="Alice", internal_address="alice@eu.contoso.com", external_address="sales@contoso.com"),
    AddressRewrite(name="EU", internal_address="eu.contoso.com", external_address="contoso.com"),
    AddressRewrite(name="Subsidiaries", internal_address="*.fabrikam.example", external_address="fabrikam.example",
                   outbound_only=True, exception_list=["legal.fabrikam.example"]),
]


@pytest.mark.parametrize(("internal", "external"), [
    ("alice@eu.contoso.com", "sales@contoso.com"),  # the address's own entry wins over its domain's
    ("Bob@EU.contoso.com", "bob@contoso.com"),  # a domain entry keeps the local part
    ("carol@nl.fabrikam.example", "carol@fabrikam.example"),  # *.domain: its subdomains
    ("carol@a.b.fabrikam.example", "carol@fabrikam.example"),
    ("dave@legal.fabrikam.example", "dave@legal.fabrikam.example"),  # on the exception list
    ("erin@fabrikam.example", "erin@fabrikam.example"),  # *.domain is not the domain itself
    ("frank@contoso.com", "frank@contoso.com"),  # no entry
    ("frank@xeu.contoso.com", "frank@xeu.contoso.com"),
])
def test_outbound_gives_the_external_form(internal: str, external: str) -> None:
    assert address_rewrite.outbound(ENTRIES, internal) == external


@pytest.mark.parametrize(("external", "internal"), [
    ("sales@contoso.com", "alice@eu.contoso.com"),
    ("SALES@contoso.com", "alice@eu.contoso.com"),
    ("bob@contoso.com", "bob@eu.contoso.com"),
    ("carol@fabrikam.example", "carol@fabrikam.example"),  # outbound only: never back
    ("nobody@elsewhere.example", "nobody@elsewhere.example"),
])
def test_inbound_reverses_the_entries_that_are_not_outbound_only(external: str, internal: str) -> None:
    assert address_rewrite.inbound(ENTRIES, external) == internal


MESSAGE = (b"From: \"Alice Anders\" <Alice@eu.contoso.com>\r\n"
           b"Reply-To: alice@eu.contoso.com (Alice),\r\n bob@eu.contoso.com\r\n"
           b"To: carol@fabrikam.example, alice@eu.contoso.com.au\r\n"
           b"Subject: alice@eu.contoso.com stays in the subject\r\n\r\n"
           b"Body: alice@eu.contoso.com stays in the body\r\n")


def test_outbound_rewrites_the_sender_fields_in_place_and_nothing_else() -> None:
    sender, raw = address_rewrite.outbound_message(ENTRIES, "alice@eu.contoso.com", MESSAGE)
    assert sender == "sales@contoso.com"
    assert raw == (b"From: \"Alice Anders\" <sales@contoso.com>\r\n"
                   b"Reply-To: sales@contoso.com (Alice),\r\n bob@contoso.com\r\n"
                   b"To: carol@fabrikam.example, alice@eu.contoso.com.au\r\n"
                   b"Subject: alice@eu.contoso.com stays in the subject\r\n\r\n"
                   b"Body: alice@eu.contoso.com stays in the body\r\n"), raw


def test_the_null_sender_stays_null_and_no_entries_change_nothing() -> None:
    assert address_rewrite.outbound_message(ENTRIES, "", MESSAGE)[0] == ""
    assert address_rewrite.outbound_message([], "alice@eu.contoso.com", MESSAGE) == ("alice@eu.contoso.com", MESSAGE)


def test_inbound_rewrites_to_and_cc_only() -> None:
    raw = (b"From: sales@contoso.com\r\nTo: Sales <sales@contoso.com>\r\nCc: bob@contoso.com\r\n"
           b"Bcc: bob@contoso.com\r\n\r\nhi\r\n")
    assert address_rewrite.inbound_message(ENTRIES, raw) == (
        b"From: sales@contoso.com\r\nTo: Sales <alice@eu.contoso.com>\r\nCc: bob@eu.contoso.com\r\n"
        b"Bcc: bob@contoso.com\r\n\r\nhi\r\n")


def test_a_field_a_dkim_signature_covers_is_left_alone() -> None:
    signed = (b"DKIM-Signature: v=1; a=rsa-sha256; d=eu.contoso.com; s=x;\r\n h=From : Subject; bh=abc; b=def\r\n"
              + MESSAGE)
    sender, raw = address_rewrite.outbound_message(ENTRIES, "alice@eu.contoso.com", signed)
    assert sender == "sales@contoso.com", "the envelope is not signed"
    assert b"From: \"Alice Anders\" <Alice@eu.contoso.com>" in raw, "From is signed"
    assert b"Reply-To: sales@contoso.com" in raw, "Reply-To is not"


def test_a_signature_still_verifies_after_inbound_rewriting_leaves_its_fields_alone() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    raw = b"From: carol@fabrikam.example\r\nTo: sales@contoso.com\r\nCc: bob@contoso.com\r\nSubject: x\r\n\r\nhi\r\n"
    signed = dkim.sign(raw, b"s", b"fabrikam.example", pem, include_headers=[b"from", b"to", b"subject"],
                       linesep=b"\r\n") + raw
    rewritten = address_rewrite.inbound_message(ENTRIES, signed)
    assert b"To: sales@contoso.com" in rewritten and b"Cc: bob@eu.contoso.com" in rewritten
    assert dkim.verify(rewritten, dnsfunc=lambda name, timeout=5: record)


@pytest.mark.parametrize("content_type", ["multipart/signed; protocol=\"application/pkcs7-signature\"",
                                          "application/pkcs7-mime; smime-type=enveloped-data",
                                          "multipart/encrypted; protocol=\"application/pgp-encrypted\""])
def test_the_header_of_a_signed_or_encrypted_message_is_left_alone(content_type: str) -> None:
    raw = f"From: alice@eu.contoso.com\r\nContent-Type: {content_type}\r\n\r\n...\r\n".encode()
    assert address_rewrite.outbound_message(ENTRIES, "alice@eu.contoso.com", raw) == ("sales@contoso.com", raw)


def test_an_unreadable_field_is_left_as_it_came() -> None:
    raw = b"From: " + b"(" * 3000 + b"alice@eu.contoso.com\r\n\r\nx\r\n"
    assert address_rewrite.outbound_message(ENTRIES, "", raw)[1] == raw
