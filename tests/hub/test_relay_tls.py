"""Hub to hub relay trusts nothing but the organization's CA (issue 11, item 4), over real
sockets with real certificates.

A hub of Amsterdam relays mail for London to a peer registered as London's hub: a small SMTP
server of this test that records every byte it receives, in clear and inside TLS, and offers
AUTH to tempt the client. A peer that offers no STARTTLS, or presents a certificate that is
self-signed, from another CA, or of the organization but for another node, must get nothing
beyond EHLO and STARTTLS (no AUTH, no secret, no mail), and the queue goes into Retry with a
4.7.5 LastError that says why, as ``mailyard queue list`` shows it. (That a hub of London
takes the Amsterdam hub's certificate as an Exchange server's, without AUTH, is in
test_receive_handler.py; the relay end to end between two sites in test_relay.py.)
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mailyard import pki, registry
from mailyard.hub.redis_queues import RedisQueues
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from mailyard.tls import self_signed
from tests.conftest import ROOT, make_org

QUEUE = "Amsterdam\\London"
PEER = "lon-peer"  # the name the capturing peer is registered with, as a hub of London
LONDON = pki.Identity.hub("London")


@dataclass
class Session:
    clear: bytearray = field(default_factory=bytearray)  # received before TLS
    secret: bytearray = field(default_factory=bytearray)  # received inside TLS
    handshake: str = ""  # "ok", or why it failed

    @property
    def received(self) -> bytes:
        return bytes(self.clear + self.secret)


class CapturingPeer:
    """An SMTP server on loopback that records what each connection sends. With a TLS context
    it offers STARTTLS; it always offers AUTH PLAIN LOGIN (and refuses every logon)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.tls: ssl.SSLContext | None = None
        self.sessions: list[Session] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, name="capturing-peer", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            session = Session()
            self.sessions.append(session)
            threading.Thread(target=self._serve, args=(conn, session, self.tls), daemon=True).start()

    def _serve(self, conn: socket.socket, session: Session, tls: ssl.SSLContext | None) -> None:
        conn.settimeout(20)
        sock: socket.socket = conn
        record = session.clear
        buf = b""
        try:
            sock.sendall(b"220 peer.example ESMTP\r\n")
            while True:
                while b"\r\n" not in buf:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return
                    record += chunk
                    buf += chunk
                line, _, buf = buf.partition(b"\r\n")
                verb = line.split(b" ", 1)[0].upper()
                if verb in (b"EHLO", b"HELO"):
                    offer = [b"250-peer.example", b"250-AUTH PLAIN LOGIN", b"250-SIZE 10485760"]
                    if tls is not None and record is session.clear:
                        offer.append(b"250-STARTTLS")
                    sock.sendall(b"\r\n".join([*offer, b"250 8BITMIME"]) + b"\r\n")
                elif verb == b"STARTTLS" and tls is not None:
                    sock.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                    try:
                        sock = tls.wrap_socket(conn, server_side=True)
                    except (ssl.SSLError, OSError) as exc:
                        session.handshake = f"failed: {exc}"
                        return
                    session.handshake = "ok"
                    record, buf = session.secret, b""
                elif verb == b"AUTH":
                    sock.sendall(b"535 5.7.8 Authentication credentials invalid\r\n")
                elif verb == b"QUIT":
                    sock.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    sock.sendall(b"250 2.0.0 OK\r\n" if verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP") else
                                 b"554 5.5.1 No\r\n")
        except OSError:
            return
        finally:
            sock.close()


def cli(site: Cluster, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "mailyard", *args], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env={**os.environ, "MAILYARD_REDIS_URL": site.redis_url})
    assert result.returncode == 0, f"mailyard {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def relay_queue(site: Cluster, *, listed: bool = False) -> dict | None:
    """The relay queue, from Redis (polling), or as `mailyard queue list --json` lists it."""
    if listed:
        return next((q for q in json.loads(cli(site, "queue", "list", "--json")) if q["identity"] == QUEUE), None)
    return next((q.as_dict() for q in RedisQueues.reader(site.r).queues() if q.identity == QUEUE), None)


@pytest.fixture(scope="module")
def relay(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("relay-tls")
    peer = CapturingPeer()
    # Retries a minute apart: the queue stays in Retry while a test reads it (every attempt
    # after the first is asked for with `queue retry`); with the tests' 1 s, a loaded machine
    # saw it back in Ready before `queue list` answered.
    slow = {"queue_glitch_retry_interval": 60, "transient_failure_retry_interval": 60,
            "outbound_connection_failure_retry_interval": 60}
    site = Cluster(redis_server.new_db(), tmp / "site", make_org(**slow), cwd=ROOT)
    beating = threading.Event()

    def heartbeat() -> None:  # the peer is London's only hub, alive as long as the test runs
        while not beating.wait(1.0):
            registry.hub_heartbeat(site.r, PEER, "London", endpoints={"Default": f"{peer.address[0]}:{peer.address[1]}"})

    registry.hub_heartbeat(site.r, PEER, "London", endpoints={"Default": f"{peer.address[0]}:{peer.address[1]}"})
    threading.Thread(target=heartbeat, name="peer-heartbeat", daemon=True).start()
    try:
        site.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
        site.start_hub("Amsterdam", "ams-t1")
        site.send("alice@contoso.com", ["erin@contoso.com"], subject="for london")  # waits in Amsterdam\London
        yield site, peer, tmp
    except BaseException:
        print(site.all_logs(60))
        raise
    finally:
        beating.set()
        site.close()
        peer.close()


def attempt(site: Cluster, peer: CapturingPeer, tls: ssl.SSLContext | None, expected: str) -> tuple[dict, Session]:
    """Let the peer offer ``tls`` (None: no STARTTLS), have Amsterdam try again now, and wait for
    the queue's last error to say ``expected``: (the queue as `queue list --json` shows it,
    what the peer received)."""
    peer.tls = tls
    seen = len(peer.sessions)
    started = time.time()

    def tried() -> dict | None:
        q = relay_queue(site)
        return q if q and len(peer.sessions) > seen and expected in (q["last_error"] or "") else None

    if relay_queue(site):  # (the first attempt happens on its own)
        cli(site, "queue", "retry", QUEUE)
    wait_until(tried, timeout=60, interval=0.2,
               message=lambda: f"{relay_queue(site)}; {len(peer.sessions) - seen} connections\n{site.tail('ams-t1')}")
    assert time.time() - started < 60
    listed = relay_queue(site, listed=True)
    assert listed is not None and expected in listed["last_error"], listed
    return listed, peer.sessions[-1]


def assert_nothing_sent(site: Cluster, session: Session) -> None:
    token = b"contoso-demo-token-change-me"  # the demo's server token of old
    received = session.received
    commands = [line.split(b" ", 1)[0].upper() for line in received.split(b"\r\n") if line]
    assert set(commands) <= {b"EHLO", b"STARTTLS"}, f"the peer got more than EHLO and STARTTLS: {received!r}"
    assert token not in received and b"exchange-server" not in received.lower()
    assert not session.secret, f"something went over the TLS link: {bytes(session.secret)!r}"


def test_a_peer_without_starttls_gets_no_auth_no_token_and_no_mail(relay) -> None:
    site, peer, _ = relay
    q, session = attempt(site, peer, None, "does not offer STARTTLS")
    assert_nothing_sent(site, session)
    assert bytes(session.clear).startswith(b"EHLO ") and b"STARTTLS" not in session.clear
    assert q["status"] == "Retry" and q["message_count"] == 1 and q["next_retry_time"]
    assert q["last_error"].startswith("451 4.7.5 ") and "nothing sent" in q["last_error"]
    assert "TLS verified against the organization's CA" in q["last_error"]
    # The text-form listing shows it too, as does each waiting message
    assert "does not offer STARTTLS" in cli(site, "queue", "list")
    (message,) = json.loads(cli(site, "queue", "messages", QUEUE, "--json"))
    assert "does not offer STARTTLS" in message["last_error"]


def test_a_peer_with_a_self_signed_certificate_gets_nothing(relay) -> None:
    site, peer, tmp = relay
    self_signed(tmp / "evil.crt", tmp / "evil.key", "evil.attacker.example")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "evil.crt", tmp / "evil.key")
    q, session = attempt(site, peer, ctx, "not issued by the organization's CA")
    assert session.handshake.startswith("failed"), "the sending hub broke off the handshake"
    assert_nothing_sent(site, session)
    assert q["status"] == "Retry" and q["last_error"].startswith("451 4.7.5 ")


def test_a_peer_with_a_certificate_of_another_ca_for_the_right_name_gets_nothing(relay) -> None:
    site, peer, tmp = relay
    other = pki.CA(tmp / "other-ca")
    other.init("Contoso")  # the same organization's name, another key
    forged = other.issue(LONDON)
    q, session = attempt(site, peer, forged.server_context(client_certs=False), "not issued by the organization's CA")
    assert session.handshake.startswith("failed")
    assert_nothing_sent(site, session)
    assert q["last_error"].startswith("451 4.7.5 ")


@pytest.mark.parametrize("identity", [pki.Identity.mailbox("MBX-AMS-01"), pki.Identity.hub("Amsterdam")],
                         ids=["a mailbox server's", "another site's"])
def test_a_peer_with_an_organization_certificate_of_another_node_gets_nothing(relay, identity: pki.Identity) -> None:
    site, peer, _ = relay
    theirs = pki.NodeCert(pki.pki_dir(site.data_dir), identity)
    q, session = attempt(site, peer, theirs.server_context(client_certs=False),
                         f"names {identity.dns_name}, not {LONDON.dns_name}")
    assert session.handshake == "ok", "the certificate verified: it is the name that is wrong"
    assert_nothing_sent(site, session)
    assert q["last_error"].startswith("451 4.7.5 ") and q["status"] == "Retry"


def test_a_hub_without_its_certificate_defers_with_that_reason(relay) -> None:
    site, peer, _ = relay
    cert = pki.NodeCert(pki.pki_dir(site.data_dir), pki.Identity.hub("Amsterdam"))
    moved = Path(f"{cert.key_path}.away")
    cert.key_path.rename(moved)
    try:
        seen = len(peer.sessions)
        cli(site, "queue", "retry", QUEUE)
        wait_until(lambda: (q := relay_queue(site)) and "is missing" in (q["last_error"] or "") and q,
                   timeout=60, interval=0.2, message=lambda: f"{relay_queue(site)}")
        q = relay_queue(site, listed=True)
        assert q is not None
        assert q["last_error"].startswith("451 4.7.5 ") and str(cert.key_path) in q["last_error"]
        assert len(peer.sessions) == seen, "no connection without a certificate to present"
    finally:
        moved.rename(cert.key_path)
