"""DKIM signing on an Edge (mailyard.hub.dkim_sign, and where send signs): every signature is
checked with dkimpy's own verifier against the published TXT record. What goes on the wire to a
peer without 8BITMIME (a real SMTP sink) is what is signed; only the organization's own mail is
signed; oversigning; IDN From domains; pending keys sign nothing."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailyard import mime
from mailyard.addresses import a_label
from mailyard.hub import dkim_sign, mx, send
from mailyard.hub.records import Item, Message, Recipient, new_message_id
from mailyard.hub.relay import INTERNAL_HEADER, ORIGIN_HEADER, from_organization
from mailyard.internet.sink import Sink, list_messages
from mailyard.org import DkimKey
from mailyard.site.ports import free_port

SELECTOR = "edge2026"


def _pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


PEM = _pem()  # (one RSA key for every domain here: making one takes a while)


def key_of(domain: str, *, active: bool = True) -> DkimKey:
    return DkimKey(domain=domain, selector=SELECTOR, private_key=PEM, active=active)


def published(*domains: str):
    """dkimpy's DNS: the TXT record of each domain's key (at its A-label name), nothing else."""
    from mailyard.dkim_keys import txt_value

    records = {f"{SELECTOR}._domainkey.{a_label(key_of(d).domain)}": txt_value(key_of(d)).encode() for d in domains}

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name.decode().rstrip(".").lower())
    return lookup


def keys(*domains: str) -> dict[str, DkimKey]:
    return {k.domain: k for k in (key_of(d) for d in domains)}


def signature_tags(raw: bytes) -> dict[str, str]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    (field,) = re.findall(r"^DKIM-Signature:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.M)
    tags = {}
    for part in re.sub(r"\s+", "", field).split(";"):
        name, _, value = part.partition("=")
        if name:
            tags[name] = value
    return tags


EIGHT_BIT = ("From: Jürgen Müller <juergen@contoso.com>\r\nTo: carol@fabrikam.example\r\n"
             "Subject: Grüße aus Köln\r\nDate: Mon, 02 Mar 2026 10:00:00 +0000\r\n"
             "Message-ID: <8bit@contoso.com>\r\nMIME-Version: 1.0\r\n"
             "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
             "Schöne Grüße, bis bald — Jürgen\r\n").encode()


# region: what goes on the wire is what is signed


@pytest.fixture
def old_peer(tmp_path: Path):
    """An SMTP peer of an older kind: neither 8BITMIME nor SMTPUTF8."""
    sink = Sink(tmp_path / "sink", host="127.0.0.3", port=free_port("127.0.0.3"), smtputf8=False,
                eightbitmime=False).start()
    yield sink
    sink.stop()


def test_an_8bit_message_to_a_peer_without_8bitmime_is_signed_as_it_was_sent(old_peer: Sink) -> None:
    # Given an Edge's job for an 8-bit message, with contoso.com's key to sign it
    item = Item(id="i1", msg="m1", queue="q", recipients=[Recipient("carol@fabrikam.example")])
    job = send.Job(item, "juergen@contoso.com", ["carol@fabrikam.example"], EIGHT_BIT, dkim=keys("contoso.com"))
    dest = send.Destination([mx.Target("mx.fabrikam.example", old_peer.host, port=old_peer.port)], old_peer.port)
    # When it is sent to a peer that lacks 8BITMIME (re-encoded as 7-bit MIME on the way)
    asyncio.run(send.transfer(dest, [job], helo="edge-01.contoso.com", timeout=15))
    assert job.outcomes["carol@fabrikam.example"].code == 250, job.outcomes
    (stored,) = list_messages(old_peer.folder, "fabrikam.example")
    raw = Path(stored["file"]).read_bytes()
    # Then the peer got 7-bit MIME, signed: the signature verifies on exactly what it received
    assert raw.isascii() and "BODY=8BITMIME" not in stored["mail_options"]
    assert raw.startswith(b"DKIM-Signature: ")
    assert dkim.verify(raw, dnsfunc=published("contoso.com")), "the signature does not verify at the receiver"
    assert f"SIZE={len(raw)}" in stored["mail_options"], "SIZE counts the signature"
    # (signing the 8-bit original, as before, gives a signature the downgrade breaks)
    downgraded = mime.downgrade(dkim_sign.sign(EIGHT_BIT, keys("contoso.com")))
    assert isinstance(downgraded, bytes) and not dkim.verify(downgraded, dnsfunc=published("contoso.com"))


# endregion

# region: only the organization's own mail is signed


def message(source: str, *, internal: bool = False) -> Message:
    return Message(id=new_message_id(), sender="alice@contoso.com", source=source, internal=internal)


BODY = (b"From: alice@contoso.com\r\nTo: grace@fabrikam.example\r\nSubject: hello\r\n"
        b"Date: Mon, 02 Mar 2026 10:00:00 +0000\r\nMessage-ID: <x@contoso.com>\r\n\r\nhello\r\n")


@pytest.mark.parametrize(("source", "internal", "signed"), [
    ("STOREDRIVER", False, True),  # from a mailbox
    ("DSN", False, True),  # a report Mailyard made
    ("SMTP", True, True),  # a logged-on user's, or relayed by a hub that marked it internal
    ("SMTP", False, False),  # from the Internet: claiming contoso.com in From, it still is not ours
])
def test_an_edge_signs_only_the_organizations_own_mail(source: str, internal: bool, signed: bool) -> None:
    dest = send.Destination([], 25, dkim=keys("contoso.com"))
    item = Item(id="i1", msg="m1", queue="q", recipients=[Recipient("grace@fabrikam.example")])
    job = send.job_of(dest, item, message(source, internal=internal), BODY)
    assert bool(job.dkim) is signed
    assert job.body == BODY


def test_relaying_within_the_organization_marks_its_own_mail_and_only_that() -> None:
    dest = send.Destination([], 25, org_origin=True, dkim=keys("contoso.com"))
    item = Item(id="i1", msg="m1", queue="q", recipients=[Recipient("grace@fabrikam.example")])
    ours, theirs = message("STOREDRIVER"), message("SMTP")
    ours_job, theirs_job = send.job_of(dest, item, ours, BODY), send.job_of(dest, item, theirs, BODY)
    assert ours_job.body.startswith(f"{ORIGIN_HEADER}: {ours.id}\r\n{INTERNAL_HEADER}: 1\r\n".encode())
    assert theirs_job.body.startswith(f"{ORIGIN_HEADER}: {theirs.id}\r\n".encode())
    assert INTERNAL_HEADER.encode() not in theirs_job.body
    assert not ours_job.dkim and not theirs_job.dkim, "a relay between nodes is never signed"


def test_the_mark_is_trusted_from_servers_of_the_organization_only() -> None:
    from mailyard.hub.receive_policy import Identity

    user, hub = Identity("user", "bob@contoso.com"), Identity("server", "hub-ams-1")
    appliance = Identity("server", "[10.0.0.9]", proven=False)  # (ExternalAuthoritative: by address only)
    assert from_organization(user, None), "a logged-on user's mail is the organization's"
    assert from_organization(hub, "1") and from_organization(hub, " 1 ")
    assert not from_organization(hub, None), "a hub relaying Internet mail does not mark it"
    assert not from_organization(None, "1"), "an anonymous client's header means nothing"
    assert not from_organization(hub, "0")
    assert not from_organization(appliance, "1"), "an appliance passes on what the Internet wrote"


def test_the_mark_is_stored_with_the_message() -> None:
    msg = message("SMTP", internal=True)
    fields = msg.fields()
    assert fields["internal"] == "1"
    assert Message.load(msg.id, {k: str(v) for k, v in fields.items()}).internal
    assert "internal" not in message("SMTP").fields()
    assert not Message.load("x", {"source": "SMTP"}).from_organization


# endregion

# region: oversigning


def test_from_subject_date_to_and_cc_are_oversigned() -> None:
    raw = dkim_sign.sign(BODY, keys("contoso.com"))
    listed = signature_tags(raw)["h"].split(":")
    for name in ("from", "subject", "date", "to", "message-id"):
        assert listed.count(name) == 2, f"{name}: {listed}"
    assert listed.count("cc") == 1, "a field the message lacks is listed once: its absence is signed"
    assert dkim.verify(raw, dnsfunc=published("contoso.com"))


@pytest.mark.parametrize("added", [b"From: ceo@contoso.com", b"Subject: urgent: wire the money",
                                   b"Date: Tue, 03 Mar 2026 09:00:00 +0000", b"To: all@contoso.com",
                                   b"Cc: everyone@fabrikam.example"])
def test_a_field_added_after_signing_breaks_the_signature(added: bytes) -> None:
    raw = dkim_sign.sign(BODY, keys("contoso.com"))
    signature, rest = raw.split(b"\r\nFrom: ", 1)[0], b"From: " + raw.split(b"\r\nFrom: ", 1)[1]
    # added above the signed field (what a reader is shown first) and below it
    above = signature + b"\r\n" + added + b"\r\n" + rest
    head, body = rest.split(b"\r\n\r\n", 1)
    below = signature + b"\r\n" + head + b"\r\n" + added + b"\r\n\r\n" + body
    assert not dkim.verify(above, dnsfunc=published("contoso.com"))
    assert not dkim.verify(below, dnsfunc=published("contoso.com"))


# endregion

# region: the From domain, and which key


@pytest.mark.parametrize("sender", ["Jürgen <jürgen@bücher.example>", "Jürgen <juergen@BÜCHER.example.>",
                                    "=?utf-8?q?J=C3=BCrgen?= <juergen@xn--bcher-kva.example>",
                                    "juergen@XN--BCHER-KVA.EXAMPLE"])
def test_an_idn_from_domain_finds_its_key_in_any_spelling(sender: str) -> None:
    raw = (f"From: {sender}\r\nTo: carol@fabrikam.example\r\nSubject: IDN\r\n\r\nhallo\r\n").encode()
    signed = dkim_sign.sign(raw, keys("bücher.example"))
    assert signed != raw, "not signed"
    assert signature_tags(signed)["d"] == "xn--bcher-kva.example"
    assert dkim.verify(signed, dnsfunc=published("bücher.example"))


def test_a_key_stored_as_a_labels_matches_too() -> None:
    key = key_of("xn--bcher-kva.example")
    raw = "From: jürgen@bücher.example\r\nSubject: IDN\r\n\r\nhallo\r\n".encode()
    assert dkim_sign.key_for(raw, {"xn--bcher-kva.example": key}) == key


def test_no_key_or_a_pending_key_or_no_single_from_leaves_the_message_unsigned() -> None:
    assert dkim_sign.sign(BODY, keys("fabrikam.example")) == BODY
    assert dkim_sign.sign(BODY, {"contoso.com": key_of("contoso.com", active=False)}) == BODY
    two = b"From: alice@contoso.com, bob@contoso.com\r\nSubject: x\r\n\r\nx\r\n"
    assert dkim_sign.sign(two, keys("contoso.com")) == two


def test_an_edge_keeps_only_active_keys_from_a_push() -> None:
    from mailyard.edgesync import config_push
    from tests.conftest import make_org

    pushed = config_push(make_org(), "Amsterdam", "EDGE-01", [],
                         dkim=[key_of("contoso.com"), key_of("contoso.com", active=False).model_copy(
                             update={"selector": "next"})])
    assert [(k.selector, k.active) for k in pushed.dkim] == [(SELECTOR, True)]


# endregion
