"""The organization's certificate authority (mailyard.pki): what it makes, with which modes,
and that a TLS link between two nodes succeeds exactly when each is who the other expects.
Real certificates and real TLS over loopback sockets."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509

from mailyard import pki
from mailyard.errors import SiteError
from tests.conftest import CONTOSO, ROOT

SITES = [("Amsterdam", ["MBX-AMS-01", "MBX-AMS-02"]), ("London", ["MBX-LON-01"])]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca(tmp_path: Path) -> pki.CA:
    return pki.issue_all(tmp_path / "pki", "Contoso", SITES)


def handshake(server: pki.NodeCert, client: ssl.SSLContext, server_name: str) -> pki.Identity | None:
    """One TLS handshake over loopback; returns who the server saw (raises what the client saw)."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server.server_context(client_certs=True).wrap_socket(conn, server_side=True) as tls:
                seen["peer"] = pki.peer_identity(tls)
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            seen["error"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with client.wrap_socket(socket.create_connection(listener.getsockname(), timeout=10),
                                server_hostname=server_name) as tls:
            assert tls.recv(2) == b"ok"
    finally:
        thread.join(timeout=10)
        listener.close()
    return seen.get("peer")  # type: ignore[return-value]


def test_the_ca_and_every_nodes_certificate_are_made_once_with_private_keys_0600(ca: pki.CA) -> None:
    assert mode(ca.key_path) == 0o600 and mode(ca.dir) == 0o700
    stems = sorted(p.stem for p in ca.dir.glob("*.crt"))
    assert stems == ["ca", "hub-amsterdam", "hub-london", "mailbox-mbx-ams-01", "mailbox-mbx-ams-02",
                     "mailbox-mbx-lon-01"]
    assert all(mode(key) == 0o600 for key in ca.dir.glob("*.key"))
    before = {p.name: p.read_bytes() for p in ca.dir.iterdir()}
    pki.issue_all(ca.dir, "Contoso", SITES)
    assert {p.name: p.read_bytes() for p in ca.dir.iterdir()} == before, "a second run keeps what is valid"


def test_a_certificate_names_its_node_under_mailyard_internal_and_the_ca_only_that(ca: pki.CA) -> None:
    cert = x509.load_pem_x509_certificate((ca.dir / "mailbox-mbx-ams-01.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mbx-ams-01.mailbox.mailyard.internal"]
    root = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    constraints = root.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical and constraints.value.permitted_subtrees == [x509.DNSName("mailyard.internal")]
    assert pki.Identity.hub("New York").dns_name == "new-york.hub.mailyard.internal"


def test_mutual_tls_between_nodes_names_both_ends(ca: pki.CA) -> None:
    mailbox = pki.NodeCert(ca.dir, pki.Identity.mailbox("MBX-AMS-01"))
    hub = pki.NodeCert(ca.dir, pki.Identity.hub("Amsterdam"))
    peer = handshake(mailbox, hub.client_context(), pki.Identity.mailbox("MBX-AMS-01").dns_name)
    assert pki.matches(peer, pki.Identity.hub("Amsterdam")) and not pki.matches(peer, pki.Identity.hub("London"))
    # a client without a certificate gets through the handshake, as nobody
    assert handshake(mailbox, pki.trust_context(ca.cert_path), mailbox.identity.dns_name) is None


def test_a_node_that_is_not_the_one_asked_for_fails_the_handshake(ca: pki.CA) -> None:
    other = pki.NodeCert(ca.dir, pki.Identity.mailbox("MBX-AMS-02"))
    client = pki.NodeCert(ca.dir, pki.Identity.hub("Amsterdam")).client_context()
    with pytest.raises(ssl.SSLCertVerificationError, match=r"[Hh]ostname mismatch"):
        handshake(other, client, pki.Identity.mailbox("MBX-AMS-01").dns_name)


def test_a_certificate_of_another_ca_is_trusted_by_no_node(ca: pki.CA, tmp_path: Path) -> None:
    rogue = pki.issue_all(tmp_path / "rogue", "Contoso", SITES)  # same names, another CA
    server = pki.NodeCert(rogue.dir, pki.Identity.mailbox("MBX-AMS-01"))
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        handshake(server, pki.trust_context(ca.cert_path), server.identity.dns_name)
    # and a rogue client certificate fails the server's handshake (CERT_OPTIONAL verifies what is shown)
    mailbox = pki.NodeCert(ca.dir, pki.Identity.mailbox("MBX-AMS-01"))
    rogue_hub = pki.NodeCert(rogue.dir, pki.Identity.hub("Amsterdam")).client_context()
    rogue_hub.load_verify_locations(cafile=str(ca.cert_path))
    with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
        handshake(mailbox, rogue_hub, mailbox.identity.dns_name)


def test_a_certificate_near_its_end_is_issued_again(ca: pki.CA, monkeypatch) -> None:
    node = pki.NodeCert(ca.dir, pki.Identity.hub("London"))
    old = node.cert_path.read_bytes()
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=pki.NODE_DAYS - pki.RENEW_DAYS + 1)
    monkeypatch.setattr(pki, "_now", lambda: later)
    assert not node.valid_from(ca)
    ca.issue(node.identity)
    assert node.cert_path.read_bytes() != old


def test_a_private_key_others_may_read_is_refused(ca: pki.CA) -> None:
    os.chmod(ca.key_path, 0o644)
    with pytest.raises(SiteError, match="may be read by other users"):
        pki.issue_all(ca.dir, "Contoso", SITES)
    node = pki.NodeCert(ca.dir, pki.Identity.hub("London"))
    os.chmod(node.key_path, 0o640)
    with pytest.raises(SiteError, match="private key"):
        node.check()


def test_half_a_ca_is_refused_rather_than_replaced(tmp_path: Path) -> None:
    ca = pki.CA(tmp_path)
    ca.init("Contoso")
    ca.key_path.unlink()
    with pytest.raises(SiteError, match="half a CA"):
        ca.init("Contoso")


def test_a_node_without_its_certificate_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(SiteError, match="mailyard org ca init"):
        pki.NodeCert(tmp_path, pki.Identity.hub("Amsterdam")).check()


def test_org_ca_init_makes_the_ca_and_every_certificate_of_the_organization_file(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "mailyard", "org", "ca", "init", str(CONTOSO),
                          "--pki-dir", str(tmp_path / "pki")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "created the CA of Contoso" in out.stdout and "london.hub.mailyard.internal" in out.stdout
    assert mode(tmp_path / "pki" / "ca.key") == 0o600
    again = subprocess.run([sys.executable, "-m", "mailyard", "org", "ca", "init", str(CONTOSO),
                            "--pki-dir", str(tmp_path / "pki")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert again.returncode == 0 and "kept the CA" in again.stdout
