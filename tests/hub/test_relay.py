"""Mail between sites: relayed over SMTP to a hub of the other site, which takes the sending
hub's certificate of the organization as an Exchange server's (mutual TLS, no AUTH: see
test_relay_tls.py for the links it refuses), categorized there and delivered to its mailbox
server; never twice, never looping."""

from __future__ import annotations

import smtplib
import ssl
from collections import Counter

from mailyard import keys, tracking
from mailyard.testing.waiting import wait_until


def unverified_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the hub's own self-signed certificate
    return ctx


def test_mail_goes_from_amsterdam_to_london_and_back(cluster_factory) -> None:
    site = cluster_factory()
    site.start_mailboxes()
    for site_name, hub in (("Amsterdam", "ams-r1"), ("London", "lon-r1"), ("London", "lon-r2")):
        site.start_hub(site_name, hub, wait=False)
    for hub in ("ams-r1", "lon-r1", "lon-r2"):
        site.wait_hub(site.procs[hub])
        site.smtp(hub)  # their receive connectors listen

    subjects = [f"to london {i}" for i in range(6)]
    for s in subjects:
        site.send("alice@contoso.com", ["erin@contoso.com", "bob@contoso.com"], subject=s)
    site.send("frank@contoso.com", ["c.claes@contoso.com"], subject="to amsterdam")
    # 29 hops before ours (MaxHopCount 30): accepted in Amsterdam, so it must arrive in London
    # too, not be bounced there for the hop Amsterdam added
    hops = "".join(f"Received: from hop{i}.example by hop{i + 1}.example; Tue, 1 Dec 2026 10:00:00 +0000\r\n"
                   for i in range(29))
    with smtplib.SMTP(*site.smtp("ams-r1"), local_hostname="client.example", timeout=15) as client:
        client.starttls(context=unverified_tls())
        client.login("alice@contoso.com", "alice-demo-password")
        client.sendmail("alice@contoso.com", ["erin@contoso.com"],
                        f"{hops}From: alice@contoso.com\r\nSubject: many hops\r\n\r\naround\r\n")
        client.mail("alice@contoso.com")
        client.rcpt("erin@contoso.com")
        code, text = client.data(f"Received: from hop.example by hop0.example; Tue, 1 Dec 2026 10:00:00 +0000\r\n"
                                 f"{hops}From: alice@contoso.com\r\nSubject: too many hops\r\n\r\naround\r\n")
        assert (code, text) == (554, b"5.4.6 Hop count exceeded - possible mail loop"), "30 before ours: refused"
    site.wait_for_subject("erin@contoso.com", "many hops", timeout=60)

    wait_until(lambda: set(subjects) <= set(site.subjects("erin@contoso.com")), timeout=60,
               message=lambda: f"erin has {site.subjects('erin@contoso.com')}")
    site.wait_for_subject("carol@contoso.com", "to amsterdam")
    erin = Counter(site.subjects("erin@contoso.com"))
    assert all(erin[s] == 1 for s in subjects), dict(erin)
    assert Counter(site.subjects("bob@contoso.com")) == Counter(subjects)

    # The path: sent by the Amsterdam hub over SMTP, received by a London hub from it
    sends = [r for r in tracking.search(site.r, event="SEND") if r.subject in subjects]
    assert sends and all(r.server == "ams-r1" for r in sends)
    london = [r for r in tracking.search(site.r, event="RECEIVE") if r.subject in subjects and r.source == "SMTP"]
    assert {r.server for r in london} <= {"lon-r1", "lon-r2"} and len(london) == len(subjects)
    assert all(r.connector.endswith("\\Default") for r in london)
    assert all("origin=" in r.context for r in london), "London took the sender for an Exchange server"

    # The London copy carries both hubs' Received headers; org headers never reach a mailbox
    (item,) = [i for i in site.folder("erin@contoso.com") if i["subject"] == subjects[0]]
    raw = site.raw("erin@contoso.com", item["id"])
    assert raw.count(b"Received:") >= 3 and b"X-Mailyard-Origin" not in raw
    assert b"with ESMTPSA" in raw, "over TLS, logged on (by the certificate)"


def test_a_repeated_relay_is_taken_in_once(cluster_factory) -> None:
    # The sending hub dies after London said 250 but before it recorded that: it relays
    # again, and London recognises the message by its origin id.
    site = cluster_factory()
    site.start_mailboxes()
    site.start_hub("Amsterdam", "ams-d1", faults="send.after_data=hub")
    site.start_hub("London", "lon-d1")
    site.smtp("lon-d1")
    site.send("bob@contoso.com", ["frank@contoso.com"], subject="relayed once")
    site.start_hub("Amsterdam", "ams-d2", wait=False)
    site.wait_for_subject("frank@contoso.com", "relayed once", timeout=60)
    assert site.r.exists(keys.fault("send.after_data")), "the sending hub was never killed"
    wait_until(lambda: len([r for r in tracking.search(site.r, event="SEND")
                            if r.subject == "relayed once"]) >= 1, timeout=30)
    receives = [r for r in tracking.search(site.r, event="RECEIVE")
                if r.subject == "relayed once" and r.source == "SMTP"]
    assert len(receives) == 1, "London must take the message in once"
    assert site.subjects("frank@contoso.com").count("relayed once") == 1
