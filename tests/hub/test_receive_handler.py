"""The receive connectors' answers over real SMTP sockets: permission groups, relay, logons,
the recipient and hop limits, and what ``250`` after DATA means (the message is in the
Submission queue, with the hub's Received header). The decisions alone, without a socket,
are in test_receive_policy.py."""

from __future__ import annotations

import smtplib
import ssl
import uuid

import pytest
from cryptography import x509

from mailyard import keys, passwords, pki, tracking
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.hub.receive_site import HUB, connect, receive_org, receive_site, reply, tls, user

OLD_DEMO_TOKEN = "contoso-demo-token-change-me"  # the demo's server token of old: it opens nothing now


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory):
    with receive_site(redis_server, tmp_path_factory.mktemp("receive-handler")) as cluster:
        yield cluster


# region: permission groups and relay


def test_anonymous_clients_on_a_connector_without_anonymous_users_are_not_authenticated(site: Cluster) -> None:
    for connector in ("Default", "Client"):
        client = connect(site, connector)
        assert reply(client, "MAIL FROM:<someone@example.org>") == (530, "5.7.1 Client was not authenticated")
        client.quit()


def test_anonymous_clients_may_send_only_to_existing_recipients_of_accepted_domains(site: Cluster) -> None:
    client = connect(site, "Internet", source="127.0.0.2")
    assert reply(client, "MAIL FROM:<someone@example.org>")[0] == 250
    assert reply(client, "RCPT TO:<bob@contoso.com>") == (250, "2.1.5 Recipient OK")
    assert reply(client, "RCPT TO:<a.anders@contoso.com>")[0] == 250, "aliases and groups are recipients"
    assert reply(client, "RCPT TO:<nobody@contoso.com>") == (550, "5.1.1 User unknown")
    assert reply(client, "RCPT TO:<friend@fabrikam.example>") == (550, "5.7.1 Unable to relay")
    client.quit()


@pytest.mark.parametrize(
    "recipient",
    [
        "<friend%fabrikam.example@contoso.com>",       # percent hack
        '<"friend@fabrikam.example"@contoso.com>',     # quoted local part
        "<@contoso.com:friend@fabrikam.example>",      # source route
        "<friend@fabrikam.example@contoso.com>",       # two at-signs
        "<fabrikam.example!friend@contoso.com>",       # bang path
        "<friend@[192.0.2.1]>",                        # IP literal
        "<friend@FABRIKAM.EXAMPLE>",                   # case
        "<friend@fabrikam.example.>",                  # trailing dot
        "<friend@contoso.com.fabrikam.example>",       # accepted domain as a prefix
        "<FRIEND@fabrikam.example >",
    ],
)
def test_no_relay_trick_works_for_anonymous_clients(site: Cluster, recipient: str) -> None:
    client = connect(site, "Internet", source="127.0.0.2")
    assert reply(client, "MAIL FROM:<spammer@example.org>")[0] == 250
    code, text = reply(client, f"RCPT TO:{recipient}")
    assert code in (550, 501, 553), f"{recipient} was answered {code} {text}"
    client.quit()


def test_logged_on_users_may_relay_but_only_as_themselves(site: Cluster) -> None:
    client = user(site)
    assert reply(client, "MAIL FROM:<bob@contoso.com>") == (
        550, "5.7.1 Client does not have permissions to send as this sender")
    assert reply(client, "MAIL FROM:<a.anders@contoso.com>")[0] == 250, "an alias is the user too"
    assert reply(client, "RCPT TO:<friend@fabrikam.example>")[0] == 250
    client.quit()


@pytest.mark.parametrize("fields", [
    'From: "Bob Berg" <bob@contoso.com>',
    "From: alice@contoso.com\r\nFrom: ceo@contoso.com",
    "From: alice@contoso.com, dave@contoso.com",
    "From: alice@contoso.com\r\nSender: bob@contoso.com",
])
def test_a_logged_on_user_cannot_put_someone_else_in_from_or_sender(site: Cluster, fields: str) -> None:
    subject = f"spoof {uuid.uuid4().hex[:8]}"
    client = user(site)
    assert reply(client, "MAIL FROM:<alice@contoso.com>")[0] == 250
    assert reply(client, "RCPT TO:<carol@contoso.com>")[0] == 250
    assert reply(client, "DATA")[0] == 354
    client.send(f"{fields}\r\nTo: carol@contoso.com\r\nSubject: {subject}\r\n\r\nfrom bob, honest\r\n.\r\n".encode())
    code, text = client.getreply()
    assert (code, text.decode()) == (550, "5.7.1 Client does not have permissions to send as this sender")
    # the session goes on, and the same message with the user's own From is taken
    assert reply(client, "MAIL FROM:<alice@contoso.com>")[0] == 250
    assert reply(client, "RCPT TO:<carol@contoso.com>")[0] == 250
    assert reply(client, "DATA")[0] == 354
    client.send(f"From: Alice <a.anders@contoso.com>\r\nTo: carol@contoso.com\r\nSubject: ok {subject}\r\n\r\nx\r\n.\r\n".encode())
    assert client.getreply()[0] == 250
    client.quit()
    site.wait_for_subject("carol@contoso.com", f"ok {subject}")
    assert subject not in " ".join(s for s in site.subjects("carol@contoso.com") if not s.startswith("ok "))


def node_cert(site: Cluster, identity: pki.Identity) -> pki.NodeCert:
    return pki.NodeCert(pki.pki_dir(site.data_dir), identity)


def starttls(client: smtplib.SMTP, ctx: ssl.SSLContext, server_name: str | None) -> ssl.SSLSocket:
    """STARTTLS asking for ``server_name`` (SNI; smtplib would send none for 127.0.0.1), then EHLO."""
    assert client.docmd("STARTTLS")[0] == 220
    client.sock = ctx.wrap_socket(client.sock, server_hostname=server_name)
    client.file = None
    client.helo_resp = client.ehlo_resp = None
    client.esmtp_features, client.does_esmtp = {}, False
    client.ehlo()
    return client.sock


AMSTERDAM_HUBS = pki.Identity.hub("Amsterdam").dns_name  # rx-1's site


def test_a_hub_of_another_site_is_an_exchange_server_by_its_certificate_and_may_relay_anything(site: Cluster) -> None:
    client = connect(site)
    sock = starttls(client, node_cert(site, pki.Identity.hub("London")).client_context(), AMSTERDAM_HUBS)
    # the context verified the site's certificate of the organization, for the name asked for
    assert pki.matches(pki.peer_identity(sock), pki.Identity.hub("Amsterdam"))
    assert reply(client, "MAIL FROM:<anyone@example.org>")[0] == 250, "no AUTH needed"
    assert reply(client, "RCPT TO:<friend@fabrikam.example>")[0] == 250
    client.quit()


def test_a_client_that_asks_for_no_hub_name_gets_the_connectors_own_certificate(site: Cluster) -> None:
    client = tls(connect(site))
    assert isinstance(client.sock, ssl.SSLSocket)
    cert = x509.load_der_x509_certificate(client.sock.getpeercert(binary_form=True))
    assert cert.subject.rfc4514_string() == f"CN={HUB}.contoso.com", "as before: the hub's self-signed one"
    client.quit()


def test_without_a_hubs_certificate_a_client_is_no_exchange_server(site: Cluster) -> None:
    trust = pki.trust_context(node_cert(site, pki.Identity.hub("Amsterdam")).ca_path)
    mailbox_server = node_cert(site, pki.Identity.mailbox("MBX-AMS-01")).client_context()
    for ctx in (trust, mailbox_server):  # no client certificate; the mailbox server's
        client = connect(site)
        starttls(client, ctx, AMSTERDAM_HUBS)
        assert reply(client, "MAIL FROM:<anyone@example.org>") == (530, "5.7.1 Client was not authenticated")
        client.quit()


def test_a_client_certificate_from_another_ca_fails_the_handshake(site: Cluster, tmp_path) -> None:
    other = pki.CA(tmp_path / "other")
    other.init("Not Contoso")
    forged = other.issue(pki.Identity.hub("London"))  # the right name, the wrong CA
    ctx = pki.trust_context(node_cert(site, pki.Identity.hub("Amsterdam")).ca_path)
    ctx.load_cert_chain(forged.cert_path, forged.key_path)
    client = connect(site)
    with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
        starttls(client, ctx, AMSTERDAM_HUBS)  # (TLS 1.3: the client hears of it at EHLO)
        reply(client, "MAIL FROM:<anyone@example.org>")
    client.close()


def test_the_old_server_logon_with_the_organizations_token_is_refused(site: Cluster) -> None:
    token = OLD_DEMO_TOKEN
    for login in ("exchange-server/other-hub", "exchange-server"):
        client = tls(connect(site))
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.login(login, token)
        assert (info.value.smtp_code, info.value.smtp_error) == (535, b"5.7.3 Authentication unsuccessful")
        assert reply(client, "MAIL FROM:<anyone@example.org>")[0] == 530
        client.close()


def log_on(site: Cluster, address: str, password: str, mechanism: str) -> tuple[int, bytes]:
    """AUTH PLAIN or LOGIN after STARTTLS on Default: the reply (235, or why not)."""
    client = tls(connect(site))
    client.user, client.password = address, password
    try:
        return client.auth(mechanism, client.auth_plain if mechanism == "PLAIN" else client.auth_login)
    except smtplib.SMTPAuthenticationError as refused:
        return refused.smtp_code, refused.smtp_error
    finally:
        client.close()


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_a_mailbox_whose_password_is_in_clear_in_the_file_logs_on_with_it(site: Cluster, mechanism: str) -> None:
    # The demo file has alice's password in clear; `org apply` stored only its hash.
    assert "alice-demo-password" not in (site.r.get(keys.ORG) or b"").decode()
    assert log_on(site, "alice@contoso.com", "alice-demo-password", mechanism)[0] == 235
    assert log_on(site, "a.anders@contoso.com", "alice-demo-password", mechanism)[0] == 235, "by an alias"
    # a wrong password: aiosmtpd's 535 5.7.8, in Exchange's words
    assert log_on(site, "alice@contoso.com", "alice-demo-passwordX", mechanism) == (
        535, b"5.7.3 Authentication unsuccessful")
    assert log_on(site, "alice@contoso.com", "bob-demo-password", mechanism)[0] == 535


def test_a_mailbox_whose_password_is_hashed_in_the_file_logs_on_with_the_password(site: Cluster) -> None:
    org = receive_org()
    hashed = passwords.hash_password("carol-new-password")
    data = org.model_dump(mode="json")
    for mb in data["mailboxes"]:
        if mb["address"] == "carol@contoso.com":
            mb["password"] = hashed
    site.apply(type(org).model_validate(data))
    try:
        wait_until(lambda: log_on(site, "carol@contoso.com", "carol-new-password", "PLAIN")[0] == 235, timeout=10)
        assert log_on(site, "carol@contoso.com", "carol-new-password", "LOGIN")[0] == 235
        assert log_on(site, "carol@contoso.com", "carol-demo-password", "PLAIN")[0] == 535, "the old one"
        assert log_on(site, "carol@contoso.com", hashed, "PLAIN")[0] == 535, "the hash is no password"
    finally:
        site.apply(receive_org())
        wait_until(lambda: log_on(site, "carol@contoso.com", "carol-demo-password", "PLAIN")[0] == 235, timeout=10)


def test_an_externally_secured_connector_trusts_its_remote_range_without_a_logon(site: Cluster) -> None:
    client = connect(site, "Apps", source="127.0.0.5")
    assert "auth" not in client.esmtp_features, "nothing to log on with"
    assert reply(client, "MAIL FROM:<app@example.org>")[0] == 250
    assert reply(client, "RCPT TO:<friend@fabrikam.example>") == (250, "2.1.5 Recipient OK")
    client.quit()


# endregion

# region: limits


def test_too_many_recipients_get_452(site: Cluster) -> None:
    client = connect(site, "Limited")
    reply(client, "MAIL FROM:<a@example.org>")
    for who in ("alice", "bob", "carol"):
        assert reply(client, f"RCPT TO:<{who}@contoso.com>")[0] == 250
    assert reply(client, "RCPT TO:<dave@contoso.com>") == (452, "4.5.3 Too many recipients")
    client.quit()


def test_a_message_that_went_around_too_often_is_refused(site: Cluster) -> None:
    client = connect(site, "Limited")
    reply(client, "MAIL FROM:<a@example.org>")
    reply(client, "RCPT TO:<bob@contoso.com>")
    hops = b"".join(b"Received: from hop%d by hop%d; Thu, 26 Nov 2026 10:00:00 +0000\r\n" % (i, i)
                    for i in range(5))
    code, text = client.data(hops + b"Subject: loop\r\n\r\nloop\r\n")
    assert (code, text) == (554, b"5.4.6 Hop count exceeded - possible mail loop")
    client.quit()


# endregion

# region: accepting mail


def test_250_means_queued_and_the_hub_adds_its_received_header(site: Cluster) -> None:
    subject = f"from the internet {uuid.uuid4().hex[:6]}"
    client = connect(site, "Internet", source="127.0.0.2")
    client.sendmail("sender@fabrikam.example", ["bob@contoso.com"],
                    f"From: sender@fabrikam.example\r\nTo: bob@contoso.com\r\nSubject: {subject}\r\n\r\nhi\r\n")
    client.quit()
    # the moment 250 came back, the message was in Redis: the RECEIVE event says so
    received = [r for r in tracking.search(site.r, event="RECEIVE") if r.subject == subject]
    assert len(received) == 1 and received[0].connector == f"{HUB}\\Internet" and received[0].client == "127.0.0.2"
    (item,) = site.wait_for_subject("bob@contoso.com", subject)
    raw = site.raw("bob@contoso.com", item["id"])
    assert b"by rx-1.contoso.com (Mailyard) with ESMTP" in raw and b"[127.0.0.2]" in raw
    assert b"Message-ID:" in raw, "a missing Message-ID is added"


def test_an_origin_header_from_outside_is_removed_and_not_trusted(site: Cluster) -> None:
    # Given two messages from the Internet that claim to be one relayed message of ours
    subject = f"forged origin {uuid.uuid4().hex[:6]}"
    for n in (1, 2):
        client = connect(site, "Internet", source="127.0.0.2")
        client.sendmail("sender@fabrikam.example", ["bob@contoso.com"],
                        f"X-Mailyard-Origin: forged-id\r\nSubject: {subject} {n}\r\n\r\nhi\r\n")
        client.quit()
    # Then both are taken in (no relay is recognised by a forged id), and neither keeps the header
    for n in (1, 2):
        (item,) = site.wait_for_subject("bob@contoso.com", f"{subject} {n}")
        assert b"X-Mailyard-Origin" not in site.raw("bob@contoso.com", item["id"])
    received = [r for r in tracking.search(site.r, event="RECEIVE") if r.subject.startswith(subject)]
    assert len(received) == 2 and not any("origin=" in r.context for r in received)


# endregion


def test_mail_to_postmaster_with_or_without_a_domain_reaches_the_postmaster(site: Cluster) -> None:
    subject = f"to postmaster {uuid.uuid4().hex[:6]}"
    client = connect(site, "Internet", source="127.0.0.2")
    assert reply(client, "MAIL FROM:<someone@fabrikam.example>")[0] == 250
    assert reply(client, "RCPT TO:<postmaster>")[0] == 250, "RFC 5321 4.5.1: without a domain"
    assert reply(client, "RCPT TO:<PostMaster@contoso.com>")[0] == 250
    assert reply(client, "DATA")[0] == 354
    client.send(f"Subject: {subject}\r\n\r\nhello postmaster\r\n.\r\n".encode())
    assert client.getreply()[0] == 250
    client.quit()
    # (this site runs no London mailbox server: the postmaster's mail is seen categorized to it)
    def routed() -> list:
        return [r for r in tracking.search(site.r, recipient="frank@contoso.com")
                if r.subject == subject and r.event in ("RESOLVE", "TRANSFER", "DELIVER", "RECEIVE")]

    assert wait_until(routed, timeout=30), "the postmaster's mail was not routed to its mailbox"
    received = [r for r in tracking.search(site.r, recipient="postmaster@contoso.com") if r.subject == subject]
    assert received and received[0].recipients == ["postmaster@contoso.com"], "both names: one recipient"
