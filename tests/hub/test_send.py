"""SMTP out through send connectors, against a real DNS server and SMTP sinks on loopback:
MX preference and fallback, null MX, NXDOMAIN, SERVFAIL, per-recipient outcomes, retry,
connection reuse, smart hosts with STARTTLS and AUTH, contacts and the Unreachable queue."""

from __future__ import annotations

import email
from collections import Counter
from email import policy
from pathlib import Path

import pytest
import trustme

from mailyard.hub.queue_rows import queue_messages
from mailyard.hub.redis_queues import RedisQueues
from mailyard.internet.dns import MX, NULL_MX, A, Behaviour, DnsServer, Zone
from mailyard.internet.sink import MAILBOX_BUSY, NO_SUCH_USER, Mode, Sink
from mailyard.org import Organization
from mailyard.site.redis_server import free_port
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT, make_org
from tests.hub.helpers import at_sink, tag


def internet_org(dns: DnsServer, port: int, **changes) -> Organization:
    data = make_org().model_dump(mode="json")
    data["transport"]["dns_servers"] = [dns.address]
    for conn in data["send_connectors"]:
        conn["port"] = port
    data.update(changes)
    return Organization.model_validate(data)


@pytest.fixture(scope="module")
def net(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("send")
    zone = Zone()
    dns = DnsServer(zone)
    dns.start()
    port = free_port()
    sinks = {}
    for i, ip in enumerate(("127.0.0.2", "127.0.0.3", "127.0.0.4"), start=1):
        # the first offers PIPELINING: the hub pipelines to it, and goes in lock step to the others
        sinks[i] = Sink(tmp / f"sink{i}", host=ip, port=port, pipelining=i == 1)
        sinks[i].start()
    cluster = Cluster(redis_server.new_db(), tmp / "site", internet_org(dns, port), cwd=ROOT)
    try:
        cluster.start_mailboxes()
        cluster.start_hub("Amsterdam", "out-1")
        cluster.start_hub("London", "lon-out-1")
        yield cluster, zone, sinks, dns, port
    finally:
        cluster.close()
        for sink in sinks.values():
            sink.stop()
        dns.stop()


def ndr_status(site: Cluster, address: str, subject: str) -> list[tuple[str, str]]:
    (item,) = site.wait_for_subject(address, f"Undeliverable: {subject}", timeout=60)
    msg = email.message_from_bytes(site.raw(address, item["id"]), policy=policy.default)
    (part,) = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    return [(b["Final-Recipient"], b["Status"]) for b in part.get_payload() if b.get("Final-Recipient")]


def queue_of(site: Cluster, identity: str):
    return next((q for q in RedisQueues.reader(site.r).queues() if q.identity == identity), None)


def test_mx_preference_then_failover_to_the_next_mx(net) -> None:
    site, zone, sinks, _, _ = net
    zone.replace("pref.example", MX(10, "mx1.pref.example"), MX(20, "mx2.pref.example"))
    zone.replace("mx1.pref.example", A("127.0.0.2"))
    zone.replace("mx2.pref.example", A("127.0.0.3"))
    first = tag("preferred")
    site.send("alice@contoso.com", ["someone@pref.example"], subject=first)
    wait_until(lambda: at_sink(sinks[1], "pref.example", first), timeout=60)
    assert not at_sink(sinks[2], "pref.example", first)

    sinks[1].set_mode(Mode.REFUSE)
    try:
        second = tag("failover")
        site.send("alice@contoso.com", ["someone@pref.example"], subject=second)
        wait_until(lambda: at_sink(sinks[2], "pref.example", second), timeout=60)
    finally:
        sinks[1].set_mode(Mode.ACCEPT)


def test_a_domain_without_mx_gets_mail_at_its_address(net) -> None:
    site, zone, sinks, _, _ = net
    zone.replace("a-only.example", A("127.0.0.3"))
    s = tag("implicit mx")
    site.send("bob@contoso.com", ["x@a-only.example"], subject=s)
    assert wait_until(lambda: at_sink(sinks[2], "a-only.example", s), timeout=60,
                      message=lambda: f"nothing at 127.0.0.3: {sinks[2].messages('a-only.example')}")


@pytest.mark.parametrize(
    ("domain", "setup", "status"),
    [
        ("nullmx.example", lambda z: z.replace("nullmx.example", NULL_MX), "5.1.2"),
        ("nowhere.example", lambda z: None, "5.4.4"),
    ],
)
def test_null_mx_and_nxdomain_are_permanent(net, domain, setup, status) -> None:
    site, zone, sinks, _, _ = net
    setup(zone)
    s = tag(domain)
    site.send("carol@contoso.com", [f"x@{domain}"], subject=s)
    assert ndr_status(site, "carol@contoso.com", s) == [(f"rfc822; x@{domain}", status)]


def test_servfail_is_transient_and_the_queue_retries(net) -> None:
    site, zone, sinks, _, _ = net
    zone.add("flaky.example")
    zone.set_behaviour("flaky.example", Behaviour.SERVFAIL)
    s = tag("servfail")
    site.send("dave@contoso.com", ["x@flaky.example"], subject=s)
    q = wait_until(lambda: (q := queue_of(site, "Amsterdam\\flaky.example")) and q.status == "Retry" and q,
                   timeout=60)
    assert "DNS query failed" in q.last_error and q.message_count == 1
    zone.set_behaviour("flaky.example", None)
    zone.replace("flaky.example", MX(10, "mx.flaky.example"))
    zone.replace("mx.flaky.example", A("127.0.0.4"))
    wait_until(lambda: at_sink(sinks[3], "flaky.example", s), timeout=60)


def test_a_4xx_then_2xx_recipient_is_delivered_once_after_a_retry(net) -> None:
    site, zone, sinks, _, _ = net
    zone.replace("busy.example", MX(10, "mx.busy.example"))
    zone.replace("mx.busy.example", A("127.0.0.2"))
    sinks[1].add_rule("ann@busy.example", MAILBOX_BUSY, times=1)
    s = tag("busy")
    site.send("alice@contoso.com", ["ann@busy.example"], subject=s)
    wait_until(lambda: at_sink(sinks[1], "busy.example", s), timeout=60)
    assert sinks[1].stats().attempts("ann@busy.example") >= 2
    assert len(at_sink(sinks[1], "busy.example", s)) == 1


def test_a_5xx_for_one_of_three_recipients_bounces_that_one_only(net) -> None:
    site, zone, sinks, _, _ = net
    zone.replace("three.example", MX(10, "mx.three.example"))
    zone.replace("mx.three.example", A("127.0.0.2"))
    sinks[1].add_rule("gone@three.example", NO_SUCH_USER)
    s = tag("three")
    site.send("bob@contoso.com", ["one@three.example", "gone@three.example", "two@three.example"], subject=s)
    assert ndr_status(site, "bob@contoso.com", s) == [("rfc822; gone@three.example", "5.1.1")]
    (stored,) = at_sink(sinks[1], "three.example", s)
    assert sorted(stored["envelope_to"]) == ["one@three.example", "two@three.example"]


def test_a_next_hop_that_is_down_puts_the_queue_in_retry_then_it_drains_over_one_connection(net) -> None:
    site, zone, sinks, _, _ = net
    zone.replace("down.example", MX(10, "mx.down.example"))
    zone.replace("mx.down.example", A("127.0.0.4"))
    sinks[3].set_mode(Mode.REFUSE)
    subjects = [tag("queued") for _ in range(5)]
    try:
        for s in subjects:
            site.send("alice@contoso.com", ["x@down.example"], subject=s)
        q = wait_until(lambda: (q := queue_of(site, "Amsterdam\\down.example")) and q.status == "Retry"
                       and q.message_count == 5 and q, timeout=60,
                       message=lambda: [x.as_dict() for x in RedisQueues.reader(site.r).queues()])
        assert "Attempted failover" in q.last_error and q.next_retry
        waiting = queue_messages(site.r, "Amsterdam\\down.example")
        # those already tried show why they wait; the others wait for the queue's retry
        assert any(m["status"] == "Retry" and "Attempted failover" in m["last_error"] for m in waiting)
        assert {m["status"] for m in waiting} <= {"Retry", "Ready"}
        sinks[3].reset_stats()
    finally:
        sinks[3].set_mode(Mode.ACCEPT)
    wait_until(lambda: all(at_sink(sinks[3], "down.example", s) for s in subjects), timeout=60)
    per_connection = sinks[3].stats().transactions
    assert max(per_connection) >= 2, f"messages per connection: {per_connection}"
    for s in subjects:
        assert len(at_sink(sinks[3], "down.example", s)) == 1


def test_mail_to_a_contact_goes_to_its_external_address(net) -> None:
    site, zone, sinks, _, _ = net
    zone.replace("fabrikam.example", MX(10, "mx.fabrikam.example"))
    zone.replace("mx.fabrikam.example", A("127.0.0.2"))
    s = tag("contact")
    site.send("alice@contoso.com", ["grace.fabrikam@contoso.com"], subject=s)
    (msg,) = wait_until(lambda: at_sink(sinks[1], "fabrikam.example", s), timeout=60)
    assert msg["envelope_to"] == ["grace@fabrikam.example"]


def test_london_sends_internet_mail_through_amsterdams_connector(net) -> None:
    site, zone, sinks, _, _ = net
    zone.replace("fromlondon.example", MX(10, "mx.fromlondon.example"))
    zone.replace("mx.fromlondon.example", A("127.0.0.3"))
    s = tag("via amsterdam")
    site.send("erin@contoso.com", ["x@fromlondon.example"], subject=s)
    (msg,) = wait_until(lambda: at_sink(sinks[2], "fromlondon.example", s), timeout=60)
    raw = Path(msg["file"]).read_bytes()
    assert b"by lon-out-1" in raw and b"by out-1" in raw, "relayed by London's hub, sent by Amsterdam's"
    assert b"X-Mailyard-Origin" not in raw


def test_smart_host_with_starttls_and_auth(net, tmp_path) -> None:
    site, zone, sinks, dns, port = net
    ca = trustme.CA()
    ctx = ca.issue_cert("127.0.0.5").configure_cert
    import ssl

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx(server_ctx)
    smart = Sink(tmp_path / "smart", host="127.0.0.5", port=free_port(), tls_context=server_ctx,
                 credentials={"relay-user": "relay-pass"})
    smart.start()
    try:
        data = site.org.model_dump(mode="json")
        data["send_connectors"].append({
            "name": "Partner", "address_spaces": ["SMTP:partner.example;1"], "dns_routing": False,
            "smart_hosts": [f"127.0.0.5:{smart.address[1]}"], "smart_host_username": "relay-user",
            "smart_host_password": "relay-pass", "require_tls": True, "source_sites": ["Amsterdam"]})
        site.apply(Organization.model_validate(data))
        s = tag("smart host")
        site.send("bob@contoso.com", ["p@partner.example"], subject=s)
        (msg,) = wait_until(lambda: at_sink(smart, "partner.example", s), timeout=60,
                            message=lambda: f"{[q.as_dict() for q in RedisQueues.reader(site.r).queues()]}{site.tail('out-1')}")
        assert msg["tls"] and msg["auth_user"] == "relay-user"
        assert queue_of(site, "Amsterdam\\Partner").delivery_type == "SmartHostConnectorDelivery"
    finally:
        smart.stop()
        site.apply(internet_org(dns, port))


def test_without_a_connector_mail_waits_in_unreachable_until_the_directory_changes(net) -> None:
    site, zone, sinks, dns, port = net
    site.apply(internet_org(dns, port, send_connectors=[]))
    zone.replace("later.example", MX(10, "mx.later.example"))
    zone.replace("mx.later.example", A("127.0.0.2"))
    s = tag("unreachable")
    try:
        site.send("dave@contoso.com", ["x@later.example"], subject=s)
        # (the sweeper resubmits the Unreachable queue once after the directory changed, so the
        # message may pass through Submission again before it settles there)
        (waiting,) = wait_until(lambda: [m for m in queue_messages(site.r, "Amsterdam\\Unreachable")
                                         if m["subject"] == s], timeout=60)
        q = queue_of(site, "Amsterdam\\Unreachable")
        assert q.delivery_type == "Unreachable" and q.next_hop == "Unreachable Domain"
        assert "5.4.4" in waiting["recipients"][0]["last_error"]
    finally:
        site.apply(internet_org(dns, port))
    wait_until(lambda: at_sink(sinks[1], "later.example", s), timeout=60)
    assert Counter(m["subject"] for m in sinks[1].messages("later.example"))[s] == 1
