"""What a receive connector does to a client that abuses it, through real SMTP sessions with two
hubs: password guessing slowed and locked out across connections and hubs (while the rightful
user elsewhere is not), directory harvesting tarpitted and disconnected, idle and endless
sessions ended with a reply that says why, connection caps (IPv6 counted by /64), groups that
take mail only from senders that proved who they are, and AUTH PLAIN's authorization identity.

Settings are short here (tarpits of a second, timeouts of seconds); the defaults are
Exchange's and are checked in test_receive_policy.py."""

from __future__ import annotations

import base64
import smtplib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from mailyard import keys, registry, tracking
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT, make_org
from tests.hub.receive_site import tls, with_connector
from tests.test_mime import nested

HUBS = ("ab-1", "ab-2")
PASSWORD = "{}-demo-password"

GUARD = {  # logons counted and locked out; no tarpit, so that the tests can guess fast
    "name": "Guard", "bindings": ["0.0.0.0:2620"], "permission_groups": ["AnonymousUsers", "ExchangeUsers"],
    "auth_mechanisms": ["Tls", "BasicAuth", "BasicAuthRequireTLS"],
    "tarpit_interval": 0, "auth_tarpit_interval": 0, "max_logon_failures": 3,
}
TARPIT = {
    "name": "Tarpit", "bindings": ["0.0.0.0:2621"], "permission_groups": ["AnonymousUsers", "ExchangeUsers"],
    "auth_mechanisms": ["Tls", "BasicAuth", "BasicAuthRequireTLS"],
    "tarpit_interval": "1s", "auth_tarpit_interval": "1500ms", "max_protocol_errors": 3,
}
SLOW = {
    "name": "Slow", "bindings": ["0.0.0.0:2622"], "permission_groups": ["AnonymousUsers"],
    "auth_mechanisms": ["Tls"], "connection_inactivity_timeout": "1500ms", "connection_timeout": "4s",
    "max_inbound_connection_per_source": 1,
}
CAPS = {
    "name": "Caps", "bindings": ["0.0.0.0:2623"], "permission_groups": ["AnonymousUsers"],
    "auth_mechanisms": ["Tls"], "max_inbound_connection": 3, "max_inbound_connection_per_source": 2,
}
SIX = {
    "name": "Six", "bindings": ["[::]:2624"], "remote_ip_ranges": ["::/0"], "permission_groups": ["AnonymousUsers"],
    "auth_mechanisms": ["Tls"], "max_inbound_connection_per_source": 2,
}


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    org = make_org(logon_failures_per_source=5, logon_failures_per_account=4,
                   logon_failure_window=120, logon_lockout_duration=120, protocol_errors_per_source=5)
    for connector in (GUARD, TARPIT, SLOW, CAPS, SIX):
        org = with_connector(org, connector)
    cluster = Cluster(redis_server.new_db(), tmp_path_factory.mktemp("abuse"), org, cwd=ROOT)
    try:
        cluster.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
        for hub in HUBS:
            cluster.start_hub("Amsterdam", hub, wait=False)
        for hub in HUBS:
            cluster.wait_hub(cluster.procs[hub])
        yield cluster
    finally:
        cluster.close()


def connect(site: Cluster, connector: str, source: str = "127.0.0.1", hub: str = HUBS[0]) -> smtplib.SMTP:
    host, port = site.smtp(hub, connector)
    client = smtplib.SMTP(host, port, local_hostname="client.example", timeout=20, source_address=(source, 0))
    client.ehlo()
    return client


def plain(authzid: str, login: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{login}\0{password}".encode()).decode()


def logon(site: Cluster, login: str, password: str, *, source: str, hub: str = HUBS[0],
          connector: str = "Guard") -> tuple[int, str]:
    """One AUTH PLAIN on a new connection: (code, text)."""
    client = tls(connect(site, connector, source, hub))
    try:
        code, text = client.docmd("AUTH", "PLAIN " + plain("", login, password))
        return code, text.decode()
    finally:
        client.close()


def read_reply(sock: socket.socket, timeout: float = 20) -> bytes:
    """Everything the server writes until it closes the connection."""
    sock.settimeout(timeout)
    out = b""
    while chunk := sock.recv(4096):
        out += chunk
    return out


# region: password guessing


def test_a_guessing_source_is_locked_out_across_connections_and_hubs_but_not_the_user_elsewhere(site: Cluster) -> None:
    guesser, elsewhere = "127.0.0.10", "127.0.0.11"
    # Five wrong passwords (logins that name no one count against the source only), over two
    # connections of one hub and one of the other: the fifth locks the source out
    for i in range(4):
        code, _ = logon(site, f"nobody{i}@contoso.com", "guess", source=guesser, hub=HUBS[i % 2])
        assert code == 535
    assert logon(site, "alice@contoso.com", "guess", source=guesser, hub=HUBS[1])[0] == 535
    # Now even the right password is refused from there, on either hub, and says why
    for hub in HUBS:
        code, text = logon(site, "alice@contoso.com", PASSWORD.format("alice"), source=guesser, hub=hub)
        assert (code, text) == (454, "4.7.0 Too many failed logons; try again later")
    # Alice, from her own machine, is not locked out
    assert logon(site, "alice@contoso.com", PASSWORD.format("alice"), source=elsewhere)[0] == 235
    events = [r for r in tracking.search(site.r, event="LOCKOUT") if r.client == guesser]
    assert len(events) == 1, events
    assert "source 127.0.0.10 locked out of logons for 2m after 5 failed logons" in events[0].context


def test_guessing_one_mailbox_from_many_sources_locks_it_for_those_sources_only(site: Cluster) -> None:
    guessers = [f"127.0.0.{n}" for n in range(20, 24)]
    for source in guessers:  # one guess each: no source reaches its own limit
        assert logon(site, "carol@contoso.com", "guess", source=source)[0] == 535
    right = PASSWORD.format("carol")
    assert logon(site, "carol@contoso.com", right, source=guessers[0])[0] == 454
    assert logon(site, "c.claes@contoso.com", right, source=guessers[1])[0] == 454, "by her alias too"
    # A source that never failed on her logs on: the guessing cannot lock carol out
    assert logon(site, "carol@contoso.com", right, source="127.0.0.30")[0] == 235
    (event,) = [r for r in tracking.search(site.r, event="LOCKOUT") if r.sender == "carol@contoso.com"]
    assert "mailbox carol@contoso.com locked out" in event.context


def test_logons_racing_each_other_are_checked_no_more_often_than_the_limit(site: Cluster) -> None:
    # Twenty connections from one source log on as frank at the same moment, one of them
    # with the right password: only as many are checked as the limits allow (5 from a source)
    source, start = "127.0.0.12", threading.Barrier(20)
    clients = [tls(connect(site, "Guard", source)) for _ in range(20)]
    passwords = ["guess"] * 19 + [PASSWORD.format("frank")]
    codes: list[int] = []

    def one(client: smtplib.SMTP, password: str) -> None:
        start.wait()
        codes.append(client.docmd("AUTH", "PLAIN " + plain("", "frank@contoso.com", password))[0])

    threads = [threading.Thread(target=one, args=pair) for pair in zip(clients, passwords, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for client in clients:
        client.close()
    assert len(codes) == 20 and set(codes) <= {235, 535, 454}, codes
    assert codes.count(535) + codes.count(235) <= 5, f"checked {codes.count(535) + codes.count(235)}: {codes}"


def test_the_mailbox_api_and_smtp_count_against_the_same_lockout(site: Cluster) -> None:
    inbox = registry.server_url(site.r, "MBX-AMS-01") + "/mailboxes/bob@contoso.com/folders/Inbox"
    # Guessed over SMTP until the source is locked out: the API refuses it too, right password or not
    for i in range(5):
        assert logon(site, f"nobody{i}@contoso.com", "guess", source="127.0.0.13")[0] == 535
    with site.client(("bob@contoso.com", PASSWORD.format("bob")), source="127.0.0.13") as http:
        refused = http.get(inbox)
        assert refused.status_code == 429 and "too many failed logons" in refused.json()["error"], refused.text
    # Guessed over the API (4 times as bob: his limit here), then locked: SMTP refuses that
    # source as bob too, right password or not
    codes = []
    for _ in range(5):
        with site.client(("bob@contoso.com", "guess"), source="127.0.0.14") as http:
            codes.append(http.get(inbox).status_code)
    assert codes == [401, 401, 401, 401, 429], codes
    assert logon(site, "bob@contoso.com", PASSWORD.format("bob"), source="127.0.0.14")[0] == 454
    with site.client(("bob@contoso.com", PASSWORD.format("bob")), source="127.0.0.15") as http:
        assert http.get(inbox).status_code == 200, "from elsewhere bob logs on"


def test_a_failed_logons_reply_waits_for_the_auth_tarpit_and_a_logged_on_session_never_waits(site: Cluster) -> None:
    client = tls(connect(site, "Tarpit", "127.0.0.40"))
    started = time.monotonic()
    code, _ = client.docmd("AUTH", "PLAIN " + plain("", "dave@contoso.com", "guess"))
    assert code == 535 and time.monotonic() - started >= 1.5
    client.close()
    client = tls(connect(site, "Tarpit", "127.0.0.41"))
    client.login("dave@contoso.com", PASSWORD.format("dave"))
    client.mail("dave@contoso.com")
    started = time.monotonic()
    for i in range(5):  # 5xx replies to a logged-on client: never tarpitted, never counted
        assert client.rcpt(f"nobody{i}@contoso.com")[0] == 550
    assert time.monotonic() - started < 1.0 * 5, "a logged-on session was tarpitted"
    assert client.noop()[0] == 250
    client.close()


def test_auth_plain_with_another_authorization_identity_fails(site: Cluster) -> None:
    client = tls(connect(site, "Guard", "127.0.0.50"))
    code, _ = client.docmd("AUTH", "PLAIN " + plain("bob@contoso.com", "erin@contoso.com", PASSWORD.format("erin")))
    assert code == 535, "erin may not act as bob"
    client.close()
    # Her own address (or an alias) as the authorization identity is her, also after a challenge
    client = tls(connect(site, "Guard", "127.0.0.51"))
    assert client.docmd("AUTH", "PLAIN")[0] == 334
    assert client.docmd(plain("erin@contoso.com", "erin@contoso.com", PASSWORD.format("erin")))[0] == 235
    client.close()
    client = tls(connect(site, "Guard", "127.0.0.52"))
    assert client.docmd("AUTH", "PLAIN")[0] == 334
    assert client.docmd(plain("bob@contoso.com", "erin@contoso.com", PASSWORD.format("erin")))[0] == 535
    client.close()


# endregion

# region: directory harvesting


def test_a_harvester_is_tarpitted_and_disconnected_after_the_error_limit(site: Cluster) -> None:
    client = connect(site, "Tarpit", "127.0.0.60")
    client.mail("someone@fabrikam.example")
    started = time.monotonic()
    assert client.rcpt("nobody1@contoso.com")[0] == 550
    assert time.monotonic() - started >= 1.0, "the 550 came before the tarpit"
    assert client.rcpt("bob@contoso.com")[0] == 250, "a 250 is never delayed"
    assert client.rcpt("nobody2@contoso.com")[0] == 550
    # The third error is answered, then the session ends with Exchange's 421
    client.send(b"RCPT TO:<nobody3@contoso.com>\r\n")
    assert client.sock is not None
    rest = read_reply(client.sock)
    assert rest == (b"550 5.1.1 User unknown\r\n"
                    b"421 4.7.0 Too many errors on this connection, closing transmission channel\r\n"), rest


def test_a_harvester_that_reconnects_for_every_guess_is_refused_at_connect_after_the_source_limit(
        site: Cluster) -> None:
    # Each guess on a connection of its own, gone before the tarpitted 550 comes: the session's
    # limit never applies, but the source's (5 here) does, on every hub
    host, port = site.smtp(HUBS[0], "Tarpit")
    for i in range(5):
        with socket.create_connection((host, port), timeout=20, source_address=("127.0.0.61", 0)) as s:
            s.recv(4096)
            s.sendall(b"EHLO h.example\r\nMAIL FROM:<x@fabrikam.example>\r\nRCPT TO:<guess%d@contoso.com>\r\n" % i)
            wait_until(lambda n=i: int(site.r.get(keys.errors_source("127.0.0.61")) or 0) > n, timeout=20,
                       message="the guess was not counted")
    for hub in HUBS:
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            connect(site, "Tarpit", "127.0.0.61", hub=hub)
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            421, b"4.7.0 Too many errors from your address; try again later")
    connect(site, "Tarpit", "127.0.0.62").quit()  # another address is let in


# endregion

# region: timeouts


def test_an_idle_session_is_told_why_it_is_closed(site: Cluster) -> None:
    client = connect(site, "Slow", "127.0.0.70")
    assert client.sock is not None
    assert read_reply(client.sock) == b"451 4.7.0 Timeout waiting for client input\r\n"


def test_a_slow_data_transfer_is_not_idle_but_every_session_ends_at_the_connection_timeout(site: Cluster) -> None:
    client = connect(site, "Slow", "127.0.0.71")
    client.mail("someone@fabrikam.example")
    client.rcpt("bob@contoso.com")
    assert client.docmd("DATA")[0] == 354
    assert client.sock is not None
    sock = client.sock
    started = time.monotonic()
    sock.setblocking(False)
    got = b""
    # One byte every 0.3 s, past the 1.5 s of inactivity allowed: the session lives on, until
    # the 4 s of ConnectionTimeout end it with a reply
    while time.monotonic() - started < 15:
        try:
            sock.send(b"x")
        except OSError:
            break
        try:
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
        except BlockingIOError:
            pass
        time.sleep(0.3)
    got += read_reply(sock)
    assert got == b"421 4.4.2 Connection timed out, closing transmission channel\r\n", got
    assert time.monotonic() - started >= 2.5, "cut for inactivity while bytes were coming"


def test_noop_does_not_keep_a_session_past_the_connection_timeout(site: Cluster) -> None:
    client = connect(site, "Slow", "127.0.0.72")
    deadline = time.monotonic() + 15
    with pytest.raises(smtplib.SMTPServerDisconnected):
        while time.monotonic() < deadline:
            code, text = client.noop()
            if code != 250:
                assert (code, text) == (421, b"4.4.2 Connection timed out, closing transmission channel")
                raise smtplib.SMTPServerDisconnected
            time.sleep(0.5)
    assert time.monotonic() < deadline


def test_a_client_that_reads_nothing_is_cut_and_its_slot_freed(site: Cluster) -> None:
    host, port = site.smtp(HUBS[0], "Slow")
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    stuck.bind(("127.0.0.73", 0))
    stuck.connect((host, port))
    stuck.setblocking(False)
    # Commands whose replies it never reads, until neither side can write any more
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            stuck.send(b"EHLO a\r\n" * 512)
        except BlockingIOError:
            time.sleep(0.05)
    try:
        with pytest.raises(smtplib.SMTPConnectError):
            connect(site, "Slow", "127.0.0.73")  # its one connection per source is taken
        # Past ConnectionTimeout and the grace for its last replies, it is cut: the slot is free
        wait_until(lambda: _admitted(site, "127.0.0.73", "Slow"), timeout=30,
                   message="a connection that reads nothing still holds its slot")
    finally:
        stuck.close()


# endregion

# region: connection caps


def test_a_hubs_sessions_on_a_connector_are_capped(site: Cluster) -> None:
    open_ = [connect(site, "Caps", source) for source in ("127.0.0.80", "127.0.0.80", "127.0.0.81")]
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        connect(site, "Caps", "127.0.0.82")
    assert refused.value.smtp_code == 421
    assert b"4.3.2 The maximum number of concurrent connections" in refused.value.smtp_error
    # The other hub counts its own
    connect(site, "Caps", "127.0.0.82", hub=HUBS[1]).quit()
    open_.pop().quit()
    wait_until(lambda: _admitted(site, "127.0.0.82"), timeout=15, message="a closed session still counted")
    for client in open_:
        client.quit()


def _admitted(site: Cluster, source: str, connector: str = "Caps") -> bool:
    try:
        connect(site, connector, source).quit()
        return True
    except smtplib.SMTPConnectError:
        return False


def test_ipv6_clients_are_counted_by_their_64(site: Cluster) -> None:
    host, port = site.smtp(HUBS[0], "Six")
    assert host == "::1"
    clients = [smtplib.SMTP(host, port, local_hostname="six.example", timeout=20) for _ in range(2)]
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP(host, port, local_hostname="six.example", timeout=20)
    assert refused.value.smtp_code == 421
    for client in clients:
        client.quit()


# endregion

# region: groups


def test_an_anonymous_sender_may_not_write_to_a_group_that_requires_authentication(site: Cluster) -> None:
    client = connect(site, "Tarpit", "127.0.0.90")
    client.mail("someone@fabrikam.example")
    code, text = client.rcpt("all-staff@contoso.com")
    assert (code, text) == (550, b"5.7.1 RESOLVER.RST.AuthRequired; authentication required")
    client.quit()
    client = tls(connect(site, "Tarpit", "127.0.0.91"))
    client.login("bob@contoso.com", PASSWORD.format("bob"))
    client.mail("bob@contoso.com")
    assert client.rcpt("all-staff@contoso.com")[0] == 250
    client.quit()


# endregion


# region: what cannot be read


@pytest.mark.parametrize("head", [
    b"From : Bob Berg <bob@contoso.com>\r\n",  # obs-from: mail clients show it; the email package skips it
    b"X-Junk\r\nFrom: Bob Berg <bob@contoso.com>\r\n",  # a line that ends the email package's reading
])
def test_a_logged_on_sender_cannot_hide_a_from_in_a_header_line_a_reader_would_skip(site: Cluster,
                                                                                    head: bytes) -> None:
    client = tls(connect(site, "Guard", "127.0.0.96"))
    client.login("alice@contoso.com", PASSWORD.format("alice"))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail("alice@contoso.com", ["carol@contoso.com"], head + b"Subject: from bob\r\n\r\nx\r\n")
    assert refused.value.smtp_code == 554, refused.value
    assert b"is not a header field" in refused.value.smtp_error
    client.quit()


def test_a_message_nested_too_deeply_to_read_is_refused_and_the_session_goes_on(site: Cluster) -> None:
    client = connect(site, "Guard", "127.0.0.95")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail("someone@fabrikam.example", ["bob@contoso.com"], nested(1500, b"x" * 1200 + b"\r\n"))
    assert refused.value.smtp_code == 554, refused.value
    assert b"5.6.0 Message refused: its MIME parts are nested too deeply" in refused.value.smtp_error
    assert client.mail("someone@fabrikam.example")[0] == 250, "the transaction after it starts afresh"
    client.quit()


# endregion
