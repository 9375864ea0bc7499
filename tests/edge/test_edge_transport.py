"""Mail through a real Edge Transport server (``mailyard edge run``, its transport the hub's
pipeline on its own Redis): from the Internet through the Edge to a hub and an Inbox, exactly
once; from an Inbox through a hub and the Edge to the Internet; the anti-spam agents at MAIL and
RCPT (connection filtering with a real DNS block list, sender filtering, recipient filtering
after the tarpit); the bypass for servers; and a hub that refuses an Edge it no longer knows.
Every server is on loopback, DNS is the project's own server."""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailyard import keys, tracking
from mailyard.internet.dns import MX, TXT, A, DnsServer, Zone
from mailyard.internet.sink import Sink
from mailyard.org import AddressRewrite, AntispamSettings, BlockListProvider, Organization
from mailyard.site.ports import free_port
from mailyard.testing.cluster import Cluster
from mailyard.testing.edge import EdgeNode
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT, make_org
from tests.hub.helpers import at_sink, tag

pytestmark = pytest.mark.slow  # (real processes: handed out first, see tests/conftest.py)

DEADLINE = 90.0
AUTHSERV_ID = "edge-01.edge.invalid"  # the Edge's FQDN (EdgeNode's subscription)
FABRIKAM_SELECTOR = "s2026"


def _fabrikam_key() -> tuple[bytes, str]:
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


FABRIKAM_KEY = _fabrikam_key()  # fabrikam.example's DKIM key, published in the demo DNS
SPAMMER = "127.0.0.66"  # listed by the block list below
STRANGER = "127.0.0.3"  # anyone else on the Internet


@dataclass
class World:
    site: Cluster
    edge: EdgeNode
    sink: Sink
    zone: Zone
    dns: DnsServer

    def apply(self, **changes: object) -> None:
        """The organization with ``changes``, applied (the subscription kept), then synced."""
        org = self.site.org.__class__.from_json(self.site.r.get(keys.ORG))
        self.site.apply(org.model_copy(update=changes))
        org_cli(self.site, "sync", "--wait", "60")


def org_cli(site: Cluster, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "mailyard", "org", "edge", *args, "--data-dir", str(site.data_dir)],
                          capture_output=True, text=True, cwd=ROOT, timeout=90, env=site._env(None))
    assert done.returncode == 0, f"mailyard org edge {' '.join(args)}: {done.stderr}"
    return done.stdout


def edge_org(dns: DnsServer) -> Organization:
    data = make_org().model_dump(mode="json")
    data["transport"]["dns_servers"] = [dns.address]
    # The organization's only way out is the Edge (no send connector of the hubs' own)
    data["send_connectors"] = []
    data["antispam"] = AntispamSettings(
        block_list_providers=[BlockListProvider(name="Demo block list", lookup_domain="bl.mailyard.test")],
        blocked_senders=["spam@fabrikam.example"], blocked_domains_and_subdomains=["spammy.example"],
        ip_allow_list=["127.0.0.7"]).model_dump(mode="json")
    return Organization.model_validate(data)


@pytest.fixture(scope="module")
def world(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("edge-transport")
    zone = Zone()
    dns = DnsServer(zone).start()
    sink = Sink(tmp / "sink", host="127.0.0.2", port=free_port("127.0.0.2")).start()
    zone.replace("fabrikam.example", MX(10, "mx.fabrikam.example"))
    zone.replace("mx.fabrikam.example", A("127.0.0.2"))
    zone.replace("66.0.0.127.bl.mailyard.test", A("127.0.0.2"))  # RFC 5782: 127.0.0.2 means listed
    zone.replace("fabrikam.example", MX(10, "mx.fabrikam.example"), TXT(f"v=spf1 ip4:{STRANGER} -all"))
    zone.replace("_dmarc.fabrikam.example", TXT("v=DMARC1; p=reject"))
    zone.replace(f"{FABRIKAM_SELECTOR}._domainkey.fabrikam.example", TXT(FABRIKAM_KEY[1]))
    site = Cluster(redis_server.new_db(), tmp / "org", edge_org(dns), cwd=ROOT)
    edge = EdgeNode(tmp / "edge", cwd=ROOT)
    try:
        site.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
        site.start_hub("Amsterdam", "hub-ams-1")
        file = edge.subscribe(tmp / "edge-subscription.json")
        edge.start()
        org_cli(site, "import", str(file), "--site", "Amsterdam")
        world = World(site, edge, sink, zone, dns)
        # The Internet connector the import made, to the demo Internet's port
        org = site.org.__class__.from_json(site.r.get(keys.ORG))
        connectors = [c.model_copy(update={"port": sink.port}) for c in org.send_connectors]
        world.apply(send_connectors=connectors)
        wait_until(lambda: edge.status()["hubs"], timeout=DEADLINE, message=lambda: f"no hubs listed: {edge.tail()}")
        edge.wait_smtp()
        yield world
    finally:
        edge.stop()
        site.close()
        sink.stop()
        dns.stop()


def smtp_to_edge(world: World, source: str = STRANGER) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", world.edge.smtp_port, local_hostname="mail.fabrikam.example", timeout=30,
                          source_address=(source, 0))
    client.ehlo()
    return client


def edge_takes(world: World, sender: str, rcpt: str) -> bool:
    """Whether the Edge accepts ``rcpt`` from ``sender`` now (MAIL and RCPT, then QUIT)."""
    with smtp_to_edge(world) as client:
        client.mail(sender)
        code, _ = client.rcpt(rcpt)
        return code == 250


def message(sender: str, to: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg["Message-ID"] = f"<{tag('id').replace(' ', '.')}@fabrikam.example>"
    msg.set_content("hello from the Internet\n")
    return msg


def edge_events(world: World, event: str) -> list[tracking.Record]:
    return [r for r in tracking.search(world.edge.r) if r.event == event]


def test_mail_from_the_internet_goes_through_the_edge_to_the_inbox_exactly_once(world: World) -> None:
    subject = tag("from the Internet")
    with smtp_to_edge(world) as client:
        client.send_message(message("carol@fabrikam.example", "bob@contoso.com", subject))
    (item,) = world.site.wait_for_subject("bob@contoso.com", subject, timeout=DEADLINE)
    raw = world.site.raw("bob@contoso.com", item["id"])
    assert f"by {AUTHSERV_ID} (Mailyard)".encode() in raw, "the Edge's Received header, by its FQDN"
    results = auth_results(raw)
    assert results == [f"{AUTHSERV_ID}; spf=pass smtp.mailfrom=carol@fabrikam.example; dkim=none; "
                       "dmarc=pass (p=reject) header.from=fabrikam.example"], results
    # The Edge's queue to the site's hubs, drained; nothing left on it
    received = [r for r in edge_events(world, "RECEIVE") if r.subject == subject]
    assert len(received) == 1 and received[0].source == "SMTP"
    sent = wait_until(lambda: [r for r in edge_events(world, "SEND") if r.subject == subject], timeout=DEADLINE)
    assert sent[0].queue == "EDGE-01\\EdgeSync - Inbound to Amsterdam", sent
    # Counted when every retry is over: once
    wait_until(lambda: not world.edge.r.zcard(keys.INFLIGHT) and not world.edge.r.zcard(keys.RETRY), timeout=DEADLINE)
    assert world.site.subjects("bob@contoso.com").count(subject) == 1


def test_mail_to_the_internet_leaves_through_the_edge(world: World) -> None:
    subject = tag("to the Internet")
    world.site.send("alice@contoso.com", ["carol@fabrikam.example"], subject=subject)
    found = wait_until(lambda: at_sink(world.sink, "fabrikam.example", subject), timeout=DEADLINE,
                       message=lambda: f"{world.site.tail('hub-ams-1')}{world.edge.tail()}")
    assert len(found) == 1
    hub_sent = [r for r in tracking.search(world.site.r) if r.event == "SEND" and r.subject == subject]
    assert hub_sent and hub_sent[0].queue == "Amsterdam\\EdgeSync - Amsterdam to Internet", hub_sent
    edge_sent = wait_until(lambda: [r for r in edge_events(world, "SEND") if r.subject == subject], timeout=DEADLINE)
    assert edge_sent[0].queue == "EDGE-01\\fabrikam.example", edge_sent
    # The Edge names itself by the FQDN of its subscription (its banner, HELO, Received)
    head = Path(found[0]["file"]).read_bytes().split(b"\r\n\r\n")[0]
    assert f"by {AUTHSERV_ID} (Mailyard)".encode() in head, head


def dkim_dns(dns_address: str):
    """dkimpy's DNS lookups, asked of the project's DNS server."""
    from mailyard.hub import mx

    resolver = mx.make_resolver([dns_address])

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        except Exception:
            return None
        return b"".join(b"".join(r.strings) for r in answer)
    return lookup


def dkim_cli(world: World, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "mailyard", "org", "dkim", *args, "--data-dir",
                           str(world.site.data_dir)], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env=world.site._env(None))
    assert done.returncode == 0, f"mailyard org dkim {' '.join(args)}: {done.stderr}"
    return done.stdout


def edge_dkim(world: World) -> list[dict]:
    return json.loads(world.edge.r.get(keys.ORG))["edge"]["dkim"]


def contoso_key(world: World) -> None:
    """contoso.com's key edge2026, made, published and activated (once), and on the Edge."""
    if not any(k["selector"] == "edge2026" and k["state"] == "active" for k in json.loads(dkim_cli(world, "list",
                                                                                                   "--json"))):
        created = json.loads(dkim_cli(world, "new", "contoso.com", "--selector", "edge2026", "--json"))
        world.zone.replace(created["name"], TXT(created["txt"]))
        dkim_cli(world, "activate", "contoso.com", "edge2026")
    wait_until(lambda: edge_dkim(world), timeout=DEADLINE, message="the key did not reach the Edge")


def test_mail_to_the_internet_is_dkim_signed_by_the_edge_and_verifies_against_the_published_key(world: World) -> None:
    import dkim

    created = json.loads(dkim_cli(world, "new", "contoso.com", "--selector", "edge2026", "--json"))
    assert created["name"] == "edge2026._domainkey.contoso.com" and created["txt"].startswith("v=DKIM1; k=rsa; p=")
    assert created["state"] == "pending"
    # A pending key is not pushed: nothing signs with it before its record is published
    org_cli(world.site, "sync", "--wait", "60")
    assert edge_dkim(world) == []
    world.zone.replace(created["name"], TXT(created["txt"]))
    dkim_cli(world, "activate", "contoso.com", "edge2026")
    wait_until(lambda: edge_dkim(world), timeout=DEADLINE, message="the key did not reach the Edge")
    subject = tag("signed")
    world.site.send("alice@contoso.com", ["carol@fabrikam.example"], subject=subject)
    (found,) = wait_until(lambda: at_sink(world.sink, "fabrikam.example", subject), timeout=DEADLINE)
    raw = Path(found["file"]).read_bytes()
    assert raw.startswith(b"DKIM-Signature: "), raw[:200]
    assert b"d=contoso.com" in raw.split(b"\r\n\r\n")[0] and b"s=edge2026" in raw.split(b"\r\n\r\n")[0]
    assert dkim.verify(raw, dnsfunc=dkim_dns(world.dns.address)), "the signature does not verify"
    # and a message changed on the way does not
    assert not dkim.verify(raw.replace(b"Subject: signed", b"Subject: altered"), dnsfunc=dkim_dns(world.dns.address))


def test_internet_mail_forwarded_out_again_is_not_signed_whatever_its_from_claims(world: World) -> None:
    # Given contoso.com's active key on the Edge, and a message from the Internet that claims to
    # be alice@contoso.com (and the organization's mark of its own mail), to a contact
    contoso_key(world)
    subject = tag("forwarded")
    msg = message("alice@contoso.com", "grace.fabrikam@contoso.com", subject)
    msg["X-Mailyard-Internal"] = "1"
    with smtp_to_edge(world) as client:
        client.send_message(msg, from_addr="carol@fabrikam.example")
    # When the hub sends it on to the contact's external address, through the Edge
    (found,) = wait_until(lambda: at_sink(world.sink, "fabrikam.example", subject), timeout=DEADLINE,
                          message=lambda: f"{world.site.tail('hub-ams-1')}{world.edge.tail()}")
    assert found["envelope_to"] == ["grace@fabrikam.example"]
    # Then it leaves unsigned: the Edge signs only the organization's own mail
    head = Path(found["file"]).read_bytes().split(b"\r\n\r\n")[0]
    assert b"DKIM-Signature:" not in head and b"X-Mailyard-Internal" not in head, head


def test_addresses_are_rewritten_on_the_way_out_and_back_in(world: World) -> None:
    import dkim

    # Given contoso.com's key on the Edge, and an entry that shows Alice to the Internet as Sales
    contoso_key(world)
    world.apply(address_rewrites=[AddressRewrite(name="Sales", internal_address="alice@contoso.com",
                                                 external_address="sales@contoso.com")])
    wait_until(lambda: json.loads(world.edge.r.get(keys.ORG))["address_rewrites"], timeout=DEADLINE,
               message="the entry did not reach the Edge")
    try:
        # When Alice writes to the Internet, it leaves as Sales, envelope and From, signed as such
        out = tag("rewritten out")
        world.site.send("alice@contoso.com", ["carol@fabrikam.example"], subject=out)
        (found,) = wait_until(lambda: at_sink(world.sink, "fabrikam.example", out), timeout=DEADLINE,
                              message=lambda: world.edge.tail())
        assert found["envelope_from"] == "sales@contoso.com", found
        raw = Path(found["file"]).read_bytes()
        head = raw.split(b"\r\n\r\n")[0]
        assert re.search(rb"^From: .*sales@contoso\.com", head, re.MULTILINE), head.decode()
        assert b"alice@contoso.com" not in head.lower(), "the internal address leaked"
        assert dkim.verify(raw, dnsfunc=dkim_dns(world.dns.address)), "the rewritten message is not signed right"
        # and Alice's own record keeps her address (a DSN would come back to her)
        sent = [r for r in edge_events(world, "SEND") if r.subject == out]
        assert sent and sent[0].sender == "alice@contoso.com", sent
        # When the Internet answers to Sales (no recipient of that name: the entry lets it in)
        back = tag("rewritten in")
        # (the receive connector takes the Edge's new organization when it is announced: an
        # instant after the transport may have, which wrote the message above)
        wait_until(lambda: edge_takes(world, "carol@fabrikam.example", "sales@contoso.com"), timeout=DEADLINE,
                   message="the Edge's receive connector does not know the entry")
        with smtp_to_edge(world) as client:
            client.send_message(message("carol@fabrikam.example", "Sales <sales@contoso.com>", back))
        (item,) = world.site.wait_for_subject("alice@contoso.com", back, timeout=DEADLINE)
        raw = world.site.raw("alice@contoso.com", item["id"])
        assert b"To: Sales <alice@contoso.com>" in raw, raw[:600]
    finally:
        world.apply(address_rewrites=[])


def auth_results(raw: bytes) -> list[str]:
    import email
    from email import policy

    msg = email.message_from_bytes(raw, policy=policy.compat32)
    return [" ".join(v.split()) for v in msg.get_all("Authentication-Results") or []]


def test_a_dkim_signed_message_passes_and_a_forged_result_is_removed(world: World) -> None:
    import dkim

    subject = tag("signed by fabrikam")
    msg = message("carol@fabrikam.example", "bob@contoso.com", subject)
    raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    signature = dkim.sign(raw, FABRIKAM_SELECTOR.encode(), b"fabrikam.example", FABRIKAM_KEY[0])
    forged = f"Authentication-Results: {AUTHSERV_ID}; dkim=pass header.d=paypal.example\r\n".encode()
    with smtp_to_edge(world) as client:
        client.sendmail("carol@fabrikam.example", ["bob@contoso.com"], forged + signature + raw)
    (item,) = world.site.wait_for_subject("bob@contoso.com", subject, timeout=DEADLINE)
    results = auth_results(world.site.raw("bob@contoso.com", item["id"]))
    assert len(results) == 1 and "paypal" not in results[0], results
    assert "dkim=pass header.d=fabrikam.example" in results[0] and "dmarc=pass" in results[0], results


def test_a_hub_drops_results_in_the_edges_name_from_anyone_but_the_edge(world: World) -> None:
    host, port = world.site.smtp("hub-ams-1", "Internet")
    subject = tag("straight to the hub")
    forged = f"Authentication-Results: {AUTHSERV_ID}; dmarc=pass header.from=bank.example\r\n".encode()
    msg = message("carol@fabrikam.example", "bob@contoso.com", subject)
    with smtplib.SMTP(host, port, local_hostname="mail.fabrikam.example", timeout=30,
                      source_address=(STRANGER, 0)) as client:
        client.sendmail("carol@fabrikam.example", ["bob@contoso.com"], forged + msg.as_bytes())
    (item,) = world.site.wait_for_subject("bob@contoso.com", subject, timeout=DEADLINE)
    assert auth_results(world.site.raw("bob@contoso.com", item["id"])) == []


def test_an_executable_attachment_is_refused_then_stripped_per_the_action(world: World) -> None:
    from tests.hub.test_attachment_filter import with_attachment

    raw = with_attachment("invoice.exe")
    with smtp_to_edge(world) as client, pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail("carol@fabrikam.example", ["bob@contoso.com"], raw)
    assert (refused.value.smtp_code, refused.value.smtp_error.decode()) == (
        550, "5.7.1 Message rejected due to unacceptable attachments")
    assert any(r.context == "Attachment Filtering: Reject: invoice.exe" for r in edge_events(world, "FAIL"))
    org = world.site.org.__class__.from_json(world.site.r.get(keys.ORG))
    world.apply(antispam=org.antispam.model_copy(update={"attachment_action": "Strip"}))

    def stripped() -> bool:  # (each try a new session: the Edge's listener rereads its organization)
        subject = tag("stripped")
        with smtp_to_edge(world) as client:
            try:
                client.sendmail("carol@fabrikam.example", ["bob@contoso.com"], raw.replace(b"Subject: files",
                                                                                         f"Subject: {subject}".encode()))
            except smtplib.SMTPDataError:
                return False
        (item,) = world.site.wait_for_subject("bob@contoso.com", subject, timeout=DEADLINE)
        delivered = world.site.raw("bob@contoso.com", item["id"])
        assert b"invoice.exe.txt" in delivered and b"This attachment was removed." in delivered
        return True
    wait_until(stripped, timeout=DEADLINE)


GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def test_the_content_filter_refuses_gtube_and_stamps_the_rest(world: World) -> None:
    assert shutil.which("rspamd"), "these tests need Debian's rspamd (.ci/run installs it)"
    msg = message("carol@fabrikam.example", "bob@contoso.com", tag("gtube"))
    msg.set_content(f"test\n{GTUBE}\n")
    with smtp_to_edge(world) as client, pytest.raises(smtplib.SMTPDataError) as refused:
        client.send_message(msg)
    assert (refused.value.smtp_code, refused.value.smtp_error.decode()) == (
        550, "5.7.1 Message rejected due to content restrictions")
    assert any(r.context.startswith("Content Filter: rejected: SCL 9 (rspamd reject") for r in edge_events(world, "FAIL"))
    subject = tag("scored")
    with smtp_to_edge(world) as client:
        client.send_message(message("carol@fabrikam.example", "bob@contoso.com", subject))
    (item,) = world.site.wait_for_subject("bob@contoso.com", subject, timeout=DEADLINE)
    assert re.search(rb"^X-Mailyard-SCL: [0-3]\r$", world.site.raw("bob@contoso.com", item["id"]), re.M)


def test_mail_above_the_junk_threshold_goes_to_junk_email_and_a_forged_scl_counts_for_nothing(world: World) -> None:
    org = world.site.org.__class__.from_json(world.site.r.get(keys.ORG))
    world.apply(transport=org.transport.model_copy(update={"scl_junk_threshold": 0}))
    try:
        # Any message rspamd scores above 0 (this one has no Date: SCL 1) goes to Junk Email
        subject = tag("junk")
        msg = message("carol@fabrikam.example", "bob@contoso.com", subject)
        with smtp_to_edge(world) as client:
            client.send_message(msg)
        world.site.wait_for_subject("bob@contoso.com", subject, folder="Junk Email", timeout=DEADLINE)
        assert subject not in world.site.subjects("bob@contoso.com")
        # straight to a hub, an SCL of the sender's own is dropped: the Inbox
        host, port = world.site.smtp("hub-ams-1", "Internet")
        subject = tag("forged scl")
        with smtplib.SMTP(host, port, timeout=30, source_address=(STRANGER, 0)) as client:
            client.sendmail("carol@fabrikam.example", ["bob@contoso.com"],
                            b"X-Mailyard-SCL: 9\r\n" + message("carol@fabrikam.example", "bob@contoso.com",
                                                                 subject).as_bytes())
        world.site.wait_for_subject("bob@contoso.com", subject, timeout=DEADLINE)
        # ...and from a colleague's own Send (the Outbox): no SCL nor results in the Edge's name
        subject = tag("colleague")
        own = message("alice@contoso.com", "bob@contoso.com", subject)
        forged = (f"X-Mailyard-SCL: 9\r\nAuthentication-Results: {AUTHSERV_ID}; spf=pass\r\n".encode()
                  + own.as_bytes().replace(b"\n", b"\r\n"))
        assert world.site.send_raw("alice@contoso.com", forged).status_code in (200, 201, 202)
        (item,) = world.site.wait_for_subject("bob@contoso.com", subject, timeout=DEADLINE)
        raw = world.site.raw("bob@contoso.com", item["id"])
        assert b"X-Mailyard-SCL" not in raw and AUTHSERV_ID.encode() not in raw, raw[:1500]
    finally:
        world.apply(transport=org.transport)


def test_mail_that_fails_dmarc_of_a_reject_policy_is_refused_at_the_end_of_data(world: World) -> None:
    # (from an address fabrikam.example's SPF does not permit, and not signed)
    with smtp_to_edge(world, source="127.0.0.4") as client, pytest.raises(smtplib.SMTPDataError) as refused:
        client.send_message(message("ceo@fabrikam.example", "bob@contoso.com", tag("forged")))
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.decode() == ("5.7.1 Unauthenticated email from fabrikam.example is not accepted "
                                                 "due to its domain's DMARC policy")
    fails = [r for r in edge_events(world, "FAIL") if r.client == "127.0.0.4"]
    assert fails and fails[0].context.startswith("Sender ID: DMARC fail for fabrikam.example"), fails


def refused_at_rcpt(world: World, rcpt: str, *, source: str = STRANGER, sender: str = "carol@fabrikam.example"
                    ) -> tuple[int, str, float]:
    with smtp_to_edge(world, source) as client:
        code, text = client.mail(sender)
        assert code == 250, text
        started = time.monotonic()
        code, text = client.rcpt(rcpt)
        return code, text.decode(), time.monotonic() - started


def test_an_unknown_recipient_is_refused_after_the_tarpit(world: World) -> None:
    code, text, took = refused_at_rcpt(world, "nobody@contoso.com")
    assert (code, text) == (550, "5.1.1 User unknown")
    assert took >= 4.9, f"answered after {took:.1f} s, before the 5 s tarpit"
    fails = [r for r in edge_events(world, "FAIL") if r.recipients == ["nobody@contoso.com"]]
    assert fails and fails[0].source == "AGENT" and fails[0].context.startswith("Recipient Filter:"), fails
    assert refused_at_rcpt(world, "bob@contoso.com")[:2] == (250, "2.1.5 Recipient OK")


def test_groups_for_authenticated_senders_are_refused_and_postmaster_is_taken(world: World) -> None:
    # all-staff nests the Amsterdam team, which takes mail only from senders that logged on
    for group in ("amsterdam-team@contoso.com", "all-staff@contoso.com"):
        code, text, _ = refused_at_rcpt(world, group)
        assert (code, text) == (550, "5.7.1 RESOLVER.RST.AuthRequired; authentication required"), group
    assert refused_at_rcpt(world, "postmaster@contoso.com")[:2] == (250, "2.1.5 Recipient OK")


def test_a_source_on_the_dns_block_list_is_refused_at_rcpt(world: World) -> None:
    code, text, _ = refused_at_rcpt(world, "bob@contoso.com", source=SPAMMER)
    assert (code, text) == (550, "5.7.1 Recipient not authorized, your IP has been found on a block list")
    fails = [r for r in edge_events(world, "FAIL") if r.client == SPAMMER]
    assert fails and "listed by Demo block list" in fails[0].context, fails
    # the allow list skips every agent, the block list included
    assert refused_at_rcpt(world, "bob@contoso.com", source="127.0.0.7")[:2] == (250, "2.1.5 Recipient OK")


@pytest.mark.parametrize("sender", ["spam@fabrikam.example", "anyone@mail.spammy.example"])
def test_a_blocked_sender_is_refused_at_mail_from(world: World, sender: str) -> None:
    with smtp_to_edge(world) as client:
        code, text = client.mail(sender)
    assert (code, text.decode()) == (554, "5.1.0 Sender Denied")
    assert any(r.sender == sender and r.context.startswith("Sender Filter:") for r in edge_events(world, "FAIL"))


def test_mail_for_another_domain_is_not_relayed_by_the_edge(world: World) -> None:
    code, text, _ = refused_at_rcpt(world, "someone@elsewhere.example")
    assert (code, text) == (550, "5.7.1 Unable to relay")


def test_the_block_list_text_is_the_operators(world: World) -> None:
    org = world.site.org.__class__.from_json(world.site.r.get(keys.ORG))
    provider = org.antispam.block_list_providers[0].model_copy(
        update={"rejection_response": "{0} is listed by {1}: see https://bl.example/lookup"})
    world.apply(antispam=org.antispam.model_copy(update={"block_list_providers": [provider]}))
    # (the Edge's listener reads its organization once a second: each try is a new session)
    code, text = wait_until(lambda: (got := refused_at_rcpt(world, "bob@contoso.com", source=SPAMMER)[:2])
                            and "bl.example" in got[1] and got, timeout=DEADLINE)
    assert (code, text) == (550, f"5.7.1 {SPAMMER} is listed by Demo block list: see https://bl.example/lookup")


def test_killing_the_edge_mid_stream_loses_nothing_it_acknowledged(world: World) -> None:
    accepted: list[str] = []
    for i in range(20):
        if i == 8:
            # SIGKILL between two messages, to `edge run` alone: its transport and rspamd end
            # with it (none is left holding a port), and it starts them again
            world.edge.kill(alone=True)
            world.edge.start()
            world.edge.wait_smtp()
        subject = tag(f"stream {i}")
        try:
            with smtp_to_edge(world) as client:
                client.send_message(message("carol@fabrikam.example", "bob@contoso.com", subject))
            accepted.append(subject)
        except (smtplib.SMTPException, OSError) as exc:
            print(f"not acknowledged ({exc!r}): the sender's to retry")
    assert len(accepted) >= 18
    for subject in accepted:
        world.site.wait_for_subject("bob@contoso.com", subject, timeout=DEADLINE)
    wait_until(lambda: not world.edge.r.zcard(keys.INFLIGHT) and not world.edge.r.zcard(keys.RETRY), timeout=DEADLINE)
    subjects = world.site.subjects("bob@contoso.com")
    doubled = [s for s in accepted if subjects.count(s) != 1]
    assert not doubled, f"not exactly once: {doubled}"


def test_zz_a_hub_takes_server_rights_only_from_a_subscribed_edge(world: World) -> None:
    # (last in this module: the Edge's subscription is removed)
    import ssl

    host, port = world.site.smtp("hub-ams-1", "Default")
    node = world.edge.data_dir / "pki"
    cert, key = next(node.glob("edge-*.crt")), next(node.glob("edge-*.key"))

    def mail_from(present: bool) -> int:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # (what is tested is the hub's view of this client)
        if present:
            ctx.load_cert_chain(cert, key)
        with smtplib.SMTP(host, port, local_hostname="edge-01.edge.invalid", timeout=30) as client:
            client.starttls(context=ctx)
            client.ehlo()
            return client.mail("carol@fabrikam.example")[0]
    assert mail_from(True) == 250, "the subscribed Edge's certificate is an Exchange server's"
    assert mail_from(False) == 530, "no certificate, no rights on the organization's own connector"
    org_cli(world.site, "remove", world.edge.name)
    wait_until(lambda: mail_from(True) == 530, timeout=DEADLINE,
               message="the certificate of a removed subscription still logs on")
