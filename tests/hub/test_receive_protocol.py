"""Receive connectors over real SMTP sockets: permission groups, relay, limits, TLS, AUTH,
smuggling and live changes. Clients from 127.0.0.1 match the ``Default`` connector (the
organization's network); clients from 127.0.0.2 match ``Internet`` (anonymous)."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import socket
import ssl
import uuid

import pytest

from mailyard import tracking
from mailyard.org import Organization
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT, make_org

LIMITED = {
    "name": "Limited",
    "bindings": ["0.0.0.0:2600"],
    "permission_groups": ["AnonymousUsers", "ExchangeUsers"],
    "auth_mechanisms": ["Tls", "BasicAuth", "BasicAuthRequireTLS"],
    "max_message_size": "4KB",
    "max_recipients_per_message": 3,
    "max_hop_count": 5,
    "max_inbound_connection_per_source": 2,
    "max_logon_failures": 3,
}


# An application server's connector: the link is secured outside SMTP (Exchange's
# ExternalAuthoritative), so clients from its one address are trusted as Exchange servers.
APPS = {
    "name": "Apps",
    "bindings": ["0.0.0.0:2601"],
    "remote_ip_ranges": ["127.0.0.5"],
    "permission_groups": ["ExchangeServers"],
    "auth_mechanisms": ["ExternalAuthoritative"],
}


def with_connector(org: Organization, connector: dict) -> Organization:
    data = org.model_dump(mode="json")
    data["receive_connectors"] = [c for c in data["receive_connectors"] if c["name"] != connector["name"]]
    data["receive_connectors"].append(connector)
    return Organization.model_validate(data)


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory):
    cluster = Cluster(redis_server.new_db(), tmp_path_factory.mktemp("receive"),
                      with_connector(with_connector(make_org(), LIMITED), APPS), cwd=ROOT)
    try:
        cluster.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
        cluster.start_hub("Amsterdam", "rx-1")
        yield cluster
    finally:
        cluster.close()


def connect(site: Cluster, connector: str = "Default", source: str = "127.0.0.1") -> smtplib.SMTP:
    host, port = site.smtp("rx-1", connector)
    client = smtplib.SMTP(host, port, local_hostname="client.example", timeout=15,
                          source_address=(source, 0))
    client.ehlo()
    return client


def tls(client: smtplib.SMTP) -> smtplib.SMTP:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    code, _ = client.starttls(context=ctx)
    assert code == 220
    client.ehlo()
    return client


def reply(client: smtplib.SMTP, command: str) -> tuple[int, str]:
    code, text = client.docmd(command)
    return code, text.decode()


def user(site: Cluster, address: str = "alice@contoso.com", connector: str = "Default") -> smtplib.SMTP:
    client = tls(connect(site, connector))
    client.login(address, f"{address.split('@')[0]}-demo-password")
    return client


# region: permission groups and relay


def test_anonymous_clients_on_a_connector_without_anonymous_users_are_not_authenticated(site) -> None:
    for connector in ("Default", "Client"):
        client = connect(site, connector)
        assert reply(client, "MAIL FROM:<someone@example.org>") == (530, "5.7.1 Client was not authenticated")
        client.quit()


def test_anonymous_clients_may_send_only_to_existing_recipients_of_accepted_domains(site) -> None:
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
def test_no_relay_trick_works_for_anonymous_clients(site, recipient: str) -> None:
    client = connect(site, "Internet", source="127.0.0.2")
    assert reply(client, "MAIL FROM:<spammer@example.org>")[0] == 250
    code, text = reply(client, f"RCPT TO:{recipient}")
    assert code in (550, 501, 553), f"{recipient} was answered {code} {text}"
    client.quit()


def test_logged_on_users_may_relay_but_only_as_themselves(site) -> None:
    client = user(site)
    assert reply(client, "MAIL FROM:<bob@contoso.com>") == (
        550, "5.7.1 Client does not have permissions to send as this sender")
    assert reply(client, "MAIL FROM:<a.anders@contoso.com>")[0] == 250, "an alias is the user too"
    assert reply(client, "RCPT TO:<friend@fabrikam.example>")[0] == 250
    client.quit()


def test_exchange_servers_log_on_with_the_server_token_and_may_relay_anything(site) -> None:
    client = tls(connect(site))
    client.login("exchange-server/other-hub", site.org.transport.server_token)
    assert reply(client, "MAIL FROM:<anyone@example.org>")[0] == 250
    assert reply(client, "RCPT TO:<friend@fabrikam.example>")[0] == 250
    client.quit()
    wrong = tls(connect(site))
    with pytest.raises(smtplib.SMTPAuthenticationError) as info:
        wrong.login("exchange-server/other-hub", "not-the-token")
    assert info.value.smtp_code == 535


def test_an_externally_secured_connector_trusts_its_remote_range_without_a_logon(site) -> None:
    client = connect(site, "Apps", source="127.0.0.5")
    assert "auth" not in client.esmtp_features, "nothing to log on with"
    assert reply(client, "MAIL FROM:<app@example.org>")[0] == 250
    assert reply(client, "RCPT TO:<friend@fabrikam.example>") == (250, "2.1.5 Recipient OK")
    client.quit()
    host, port = site.smtp("rx-1", "Apps")
    with smtplib.SMTP(timeout=15) as outsider:
        outsider.source_address = ("127.0.0.6", 0)
        code, text = outsider.connect(host, port)
    assert code == 421, f"a client outside the range got {code} {text!r}"


# endregion

# region: TLS, AUTH and limits


def test_auth_is_offered_only_after_starttls_where_tls_is_required(site) -> None:
    client = connect(site)
    assert "starttls" in client.esmtp_features and "auth" not in client.esmtp_features
    plain = base64.b64encode(b"\0alice@contoso.com\0alice-demo-password").decode()
    code, _ = reply(client, f"AUTH PLAIN {plain}")
    assert code in (530, 538), "AUTH in clear text must be refused"
    tls(client)
    assert "auth" in client.esmtp_features
    client.quit()


def test_three_failed_logons_close_the_connection(site) -> None:
    client = tls(connect(site))
    for _ in range(2):
        code, text = reply(client, "AUTH PLAIN " + base64.b64encode(b"\0alice@contoso.com\0bad").decode())
        assert (code, text) == (535, "5.7.3 Authentication unsuccessful")
    code, _ = reply(client, "AUTH PLAIN " + base64.b64encode(b"\0alice@contoso.com\0bad").decode())
    assert code == 535
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
        client.docmd("NOOP")
        client.docmd("NOOP")


def test_size_is_advertised_and_enforced(site) -> None:
    client = connect(site, "Limited")
    assert client.esmtp_features["size"] == str(4 * 1024)
    assert reply(client, "MAIL FROM:<a@example.org> SIZE=999999") == (
        552, "5.3.4 Message size exceeds fixed maximum message size")
    assert reply(client, "MAIL FROM:<a@example.org>")[0] == 250
    assert reply(client, "RCPT TO:<bob@contoso.com>")[0] == 250
    code, text = client.data(b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 80)
    assert (code, text) == (552, b"5.3.4 Message size exceeds fixed maximum message size")
    client.quit()


def test_too_many_recipients_get_452(site) -> None:
    client = connect(site, "Limited")
    reply(client, "MAIL FROM:<a@example.org>")
    for who in ("alice", "bob", "carol"):
        assert reply(client, f"RCPT TO:<{who}@contoso.com>")[0] == 250
    assert reply(client, "RCPT TO:<dave@contoso.com>") == (452, "4.5.3 Too many recipients")
    client.quit()


def test_a_message_that_went_around_too_often_is_refused(site) -> None:
    client = connect(site, "Limited")
    reply(client, "MAIL FROM:<a@example.org>")
    reply(client, "RCPT TO:<bob@contoso.com>")
    hops = b"".join(b"Received: from hop%d by hop%d; Thu, 26 Nov 2026 10:00:00 +0000\r\n" % (i, i)
                    for i in range(5))
    code, text = client.data(hops + b"Subject: loop\r\n\r\nloop\r\n")
    assert (code, text) == (554, b"5.4.6 Hop count exceeded - possible mail loop")
    client.quit()


def test_connections_per_source_are_capped(site) -> None:
    host, port = site.smtp("rx-1", "Limited")
    # (connections of earlier tests are released asynchronously, a moment after QUIT)
    held = [wait_until(lambda: connect(site, "Limited"), timeout=10) for _ in range(2)]
    with socket.create_connection((host, port), timeout=10) as third:
        greeting = third.recv(200).decode()
    assert greeting.startswith("421 4.3.2"), greeting
    for client in held:
        client.quit()
    wait_until(lambda: connect(site, "Limited").quit(), timeout=10)


def test_replies_carry_enhanced_status_codes(site) -> None:
    client = connect(site, "Internet", source="127.0.0.2")
    assert reply(client, "RCPT TO:<bob@contoso.com>") == (503, "5.5.2 Need mail command")
    assert reply(client, "DATA")[0] == 503
    assert reply(client, "FOO")[1].startswith("5.3.3")
    assert reply(client, "NOOP") == (250, "2.0.0 OK")
    client.quit()


# endregion

# region: accepting mail


def test_250_means_queued_and_the_hub_adds_its_received_header(site) -> None:
    subject = f"from the internet {uuid.uuid4().hex[:6]}"
    client = connect(site, "Internet", source="127.0.0.2")
    client.sendmail("sender@fabrikam.example", ["bob@contoso.com"],
                    f"From: sender@fabrikam.example\r\nTo: bob@contoso.com\r\nSubject: {subject}\r\n\r\nhi\r\n")
    client.quit()
    # the moment 250 came back, the message was in Redis: the RECEIVE event says so
    received = [r for r in tracking.search(site.r, event="RECEIVE") if r.subject == subject]
    assert len(received) == 1 and received[0].connector == "rx-1\\Internet" and received[0].client == "127.0.0.2"
    (item,) = site.wait_for_subject("bob@contoso.com", subject)
    raw = site.raw("bob@contoso.com", item["id"])
    assert b"by rx-1.contoso.com (Mailyard) with ESMTP" in raw and b"[127.0.0.2]" in raw
    assert b"Message-ID:" in raw, "a missing Message-ID is added"


def test_smtp_smuggling_does_not_split_a_message(site) -> None:
    subject = f"smuggle {uuid.uuid4().hex[:6]}"
    host, port = site.smtp("rx-1", "Internet")
    payload = (
        f"Subject: {subject}\r\n\r\nfirst part\n.\nMAIL FROM:<evil@example.org>\r\n"
        "RCPT TO:<carol@contoso.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nsecond\r\n"
        "text\r\n.\nmore\n.\r\nstill the same message\r\n.\r\n"
    ).encode()
    with socket.create_connection((host, port), timeout=10, source_address=("127.0.0.2", 0)) as s:
        f = s.makefile("rb")
        f.readline()
        for line in (b"EHLO client.example\r\n", b"MAIL FROM:<x@example.org>\r\n", b"RCPT TO:<bob@contoso.com>\r\n",
                     b"DATA\r\n"):
            s.sendall(line)
            while (resp := f.readline())[3:4] == b"-":
                pass
        assert resp.startswith(b"354")
        s.sendall(payload)
        assert f.readline().startswith(b"250")
        s.sendall(b"QUIT\r\n")
    (item,) = site.wait_for_subject("bob@contoso.com", subject)
    body = site.raw("bob@contoso.com", item["id"])
    assert b"still the same message" in body and b"Subject: smuggled" in body
    assert "smuggled" not in site.subjects("carol@contoso.com")
    assert "smuggled" not in site.subjects("bob@contoso.com")


def test_a_receive_connector_change_takes_effect_without_a_restart(site) -> None:
    pid = site.procs["rx-1"].pid
    changed = with_connector(site.org, {"name": "Internet", "bindings": ["0.0.0.0:25"],
                                        "permission_groups": ["ExchangeUsers"], "auth_mechanisms": ["Tls"]})
    site.apply(changed)

    def refused() -> bool:
        client = connect(site, "Internet", source="127.0.0.2")
        code, _ = reply(client, "MAIL FROM:<someone@example.org>")
        client.quit()
        return code == 530

    try:
        wait_until(refused, timeout=15, message="anonymous mail still accepted after the change")
        assert site.procs["rx-1"].pid == pid and site.procs["rx-1"].alive
    finally:
        site.apply(with_connector(with_connector(make_org(), LIMITED), APPS))
        wait_until(lambda: not refused(), timeout=15)


# endregion


@pytest.mark.parametrize("arg", [
    "<a@b.example>", " <first.last+tag@mail.example.co.uk> SIZE=100 BODY=8BITMIME", "<a@b.example> ",
    "<a@b.example>\tX", "<user%other@contoso.com>", "<A!B@C.EXAMPLE>",
])
def test_plain_addresses_take_a_fast_path_that_reads_them_as_the_rfc_5322_parser_does(arg: str) -> None:
    from aiosmtpd.smtp import SMTP

    from mailyard.hub.receive_protocol import SIMPLE_PATH

    simple = SIMPLE_PATH.match(arg)
    assert simple, f"{arg!r} is a plain path"
    parsed = SMTP._getaddr(SMTP(object(), loop=asyncio.new_event_loop()), arg)
    assert (f"{simple['local']}@{simple['domain']}", simple["rest"] or "") == parsed, arg


@pytest.mark.parametrize("arg", [
    "<a..b@c.example>", "<.a@c.example>", "<a@-b.example>", "<a@b..example>", "<a@b.example.>", '<"q"@b.example>',
    "<a@[1.2.3.4]>", "<@x.example:a@b.example>", "<a@b.example", "a@b.example", "<a@b.example>SIZE=1",
    "<a@b.example> \nX", "<é@b.example>", "<a@b_c.example>", "<>",
])
def test_every_other_address_goes_to_the_rfc_5322_parser(arg: str) -> None:
    from mailyard.hub.receive_protocol import SIMPLE_PATH

    assert SIMPLE_PATH.match(arg) is None, f"{arg!r} must be judged by the full parser"
