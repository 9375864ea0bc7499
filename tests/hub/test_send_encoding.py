"""SMTPUTF8 and 8BITMIME out (RFC 6531, RFC 6152), and lines over 998 octets, against a real
DNS server and SMTP sinks: a peer of today (127.0.0.2: SMTPUTF8 and 8BITMIME) and one of an
older kind (127.0.0.3: neither), with hubs in Amsterdam and London relaying to each other."""

from __future__ import annotations

import email
from email import policy
from pathlib import Path

import pytest

from mailyard.internet.dns import MX, A, DnsServer, Zone
from mailyard.internet.sink import Sink
from mailyard.org import Organization
from mailyard.site.redis_server import free_port
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT, make_org
from tests.hub.helpers import at_sink, tag

JURGEN = "jürgen@contoso.com"  # a mailbox in London, with an alias in an IDN accepted domain
MODERN, OLD = "127.0.0.2", "127.0.0.3"


def encoding_org(dns: DnsServer, port: int) -> Organization:
    data = make_org().model_dump(mode="json")
    data["transport"]["dns_servers"] = [dns.address]
    for conn in data["send_connectors"]:
        conn["port"] = port
    data["accepted_domains"].append("xn--bcher-kva.example")  # bücher.example, written as A-labels
    data["mailboxes"].append({"address": "Jürgen@contoso.com", "name": "Jürgen Müller", "server": "MBX-LON-01",
                              "aliases": ["jürgen@bücher.example"]})
    return Organization.model_validate(data)


@pytest.fixture(scope="module")
def net(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("send-encoding")
    zone = Zone()
    for domain, ip in (("modern.example", MODERN), ("xn--mnchen-3ya.example", MODERN), ("old.example", OLD)):
        zone.replace(domain, MX(10, f"mx.{domain}"))
        zone.replace(f"mx.{domain}", A(ip))
    dns = DnsServer(zone)
    dns.start()
    port = free_port()
    sinks = {"modern": Sink(tmp / "modern", host=MODERN, port=port),
             "old": Sink(tmp / "old", host=OLD, port=port, smtputf8=False, eightbitmime=False)}
    for sink in sinks.values():
        sink.start()
    cluster = Cluster(redis_server.new_db(), tmp / "site", encoding_org(dns, port), cwd=ROOT)
    try:
        cluster.start_mailboxes()
        cluster.start_hub("Amsterdam", "enc-ams-1")
        cluster.start_hub("London", "enc-lon-1")
        yield cluster, sinks
    finally:
        cluster.close()
        for sink in sinks.values():
            sink.stop()
        dns.stop()


def text(msg: email.message.Message) -> str:
    assert isinstance(msg, email.message.EmailMessage)
    return msg.get_content().replace("\r\n", "\n")


def stored(item: dict) -> bytes:
    return Path(item["file"]).read_bytes()


def test_a_utf8_recipient_in_another_site_gets_mail_over_smtputf8_between_the_hubs(net) -> None:
    site, _ = net
    s = tag("für Jürgen")
    site.send("alice@contoso.com", ["Jürgen@xn--bcher-kva.example"], subject=s, body="grüße\n")
    (item,) = site.wait_for_subject(JURGEN, s)
    raw = site.raw(JURGEN, item["id"])
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert text(msg) == "grüße\n"
    assert b"by enc-lon-1" in raw and b"with UTF8SMTPS" in raw, "relayed from Amsterdam with SMTPUTF8 (RFC 6531 4.3)"


def test_smtputf8_goes_to_a_peer_that_offers_it_and_an_idn_domain_is_found_by_its_a_labels(net) -> None:
    site, sinks = net
    s = tag("smtputf8 out")
    site.send("alice@contoso.com", ["josé@modern.example", "info@münchen.example"], subject=s)
    (one,) = wait_until(lambda: at_sink(sinks["modern"], "modern.example", s), timeout=60)
    (two,) = wait_until(lambda: at_sink(sinks["modern"], "münchen.example", s), timeout=60)
    assert one["envelope_to"] == ["josé@modern.example"] and "SMTPUTF8" in one["mail_options"]
    assert two["envelope_to"] == ["info@münchen.example"]


def ndr(site: Cluster, address: str, subject: str) -> tuple[list[tuple[str, str, str]], str]:
    (item,) = site.wait_for_subject(address, f"Undeliverable: {subject}", timeout=60)
    msg = email.message_from_bytes(site.raw(address, item["id"]), policy=policy.default)
    (status,) = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = [(b["Final-Recipient"], b["Status"], b["Diagnostic-Code"]) for b in status.get_payload()
              if b.get("Final-Recipient")]
    return blocks, next(p for p in msg.walk() if p.get_content_type() == "text/plain").get_content()


def test_a_peer_without_smtputf8_gets_nothing_and_the_sender_an_ndr_that_says_why(net) -> None:
    site, sinks = net
    s = tag("to an old peer")
    site.send("alice@contoso.com", ["jörg@old.example"], subject=s)
    blocks, text = ndr(site, "alice@contoso.com", s)
    assert blocks == [("utf-8; j\\x{F6}rg@old.example", "5.6.7",  # RFC 6533's form of the address
                       "smtp; 550 5.6.7 SMTPUTF8 is required, but was not offered by host mx.old.example")]
    assert "jörg@old.example" in text
    assert not at_sink(sinks["old"], "old.example", s)


def test_an_ndr_to_a_utf8_sender_is_an_smtputf8_message_that_reaches_it(net) -> None:
    site, _ = net
    s = tag("from Jürgen")
    site.send(JURGEN, ["jörg@old.example"], subject=s)
    blocks, _ = ndr(site, JURGEN, s)
    assert [b[1] for b in blocks] == ["5.6.7"]


def test_8bit_goes_as_8bitmime_where_offered_and_as_quoted_printable_where_not(net) -> None:
    site, sinks = net
    s = tag("crème")
    site.send("alice@contoso.com", ["chef@modern.example", "chef@old.example"], subject=s, body="crème brûlée\n")
    (modern,) = wait_until(lambda: at_sink(sinks["modern"], "modern.example", s), timeout=60)
    (old,) = wait_until(lambda: at_sink(sinks["old"], "old.example", s), timeout=60)
    assert "BODY=8BITMIME" in modern["mail_options"] and not stored(modern).isascii()
    assert "BODY=8BITMIME" not in old["mail_options"]
    raw = stored(old)
    assert raw.isascii(), "8-bit octets sent to a peer without 8BITMIME (RFC 6152)"
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert text(msg) == "crème brûlée\n"


def test_a_line_over_998_octets_arrives_in_another_site_and_on_the_internet_re_encoded_once(net) -> None:
    site, sinks = net
    s = tag("long line")
    line = "long " * 300  # 1500 octets
    raw = (f"From: alice@contoso.com\r\nTo: erin@contoso.com, x@old.example\r\nSubject: {s}\r\n\r\n"
           f"{line}\r\nend\r\n").encode()
    assert site.send_raw("alice@contoso.com", raw).status_code == 202
    (item,) = site.wait_for_subject("erin@contoso.com", s)  # in London: over SMTP between the sites
    (out,) = wait_until(lambda: at_sink(sinks["old"], "old.example", s), timeout=60)
    for got in (site.raw("erin@contoso.com", item["id"]), stored(out)):
        assert max(map(len, got.split(b"\r\n"))) <= 998
        msg = email.message_from_bytes(got, policy=policy.default)
        assert msg["Content-Transfer-Encoding"] == "quoted-printable"
        assert text(msg) == f"{line}\nend\n"
