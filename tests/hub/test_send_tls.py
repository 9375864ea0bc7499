"""Outbound TLS of send connectors, as Exchange's Set-SendConnector has it: opportunistic by
default (STARTTLS when offered, any certificate), and with ``require_tls`` a
``tls_auth_level`` of EncryptionOnly, CertificateValidation or DomainValidation, checked
against the system's CA store. A smart host's password is only ever sent inside TLS. Real
SMTP servers over loopback sockets, real certificates (trustme)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from mailyard.errors import ConfigError, TransientDeliveryError
from mailyard.hub import mx, send
from mailyard.internet.sink import Sink
from mailyard.org import parse_org
from tests.conftest import CONTOSO

MX_NAME = "mx.partner.example"


@pytest.fixture(scope="module")
def public_ca() -> trustme.CA:
    """A CA the system store trusts in these tests (SSL_CERT_FILE points at it)."""
    return trustme.CA()


@pytest.fixture(autouse=True)
def system_store(public_ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "system-cas.pem"
    public_ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))


def sink(tmp: Path, ca: trustme.CA | None, name: str = MX_NAME, **kw) -> Sink:
    ctx = None
    if ca is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(ctx)
    return Sink(tmp / "sink", host="127.0.0.6", port=0, tls_context=ctx, **kw)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    started: list[Sink] = []

    def start(ca: trustme.CA | None, name: str = MX_NAME, **kw) -> Sink:
        server = sink(tmp_path, ca, name, **kw)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def open_to(server: Sink, **dest) -> str:
    """Connect as a send connector with these settings; the cipher, or what refused it."""
    target = mx.Target(MX_NAME, server.address[0], port=server.address[1])
    destination = send.Destination([target], server.address[1], **dest)

    async def go() -> str:
        smtp = await send._open(target, server.address[1], destination, helo="out-1.contoso.com", timeout=10)
        try:
            info = smtp.get_transport_info("ssl_object")
            return info.version() if info else "clear"
        finally:
            smtp.close()

    try:
        return asyncio.run(go())
    except TransientDeliveryError as exc:
        assert exc.code == 451 and exc.status == "4.7.5", exc
        return f"refused: {exc.text}"


def test_by_default_tls_is_opportunistic_any_certificate_and_clear_text_without(serve, public_ca) -> None:
    assert open_to(serve(trustme.CA())).startswith("TLS"), "an unknown CA is fine: encryption only"
    assert open_to(serve(None)) == "clear", "no STARTTLS: clear text, as Exchange 2010 sends"


def test_require_tls_refuses_a_peer_without_starttls(serve) -> None:
    out = open_to(serve(None), require_tls=True)
    assert out.startswith("refused") and "does not offer STARTTLS" in out


@pytest.mark.parametrize("level", [None, "EncryptionOnly"])
def test_encryption_only_takes_any_certificate(serve, level) -> None:
    assert open_to(serve(trustme.CA(), name="whatever.invalid"), require_tls=True, tls_auth_level=level).startswith("TLS")


def test_certificate_validation_wants_a_chain_the_system_trusts_for_any_name(serve, public_ca) -> None:
    assert open_to(serve(public_ca, name="other.example"), require_tls=True,
                   tls_auth_level="CertificateValidation").startswith("TLS")
    out = open_to(serve(trustme.CA()), require_tls=True, tls_auth_level="CertificateValidation")
    assert out.startswith("refused") and "did not present a valid certificate" in out, out


def test_domain_validation_wants_the_hosts_name_or_the_tls_domain(serve, public_ca) -> None:
    level = {"require_tls": True, "tls_auth_level": "DomainValidation"}
    assert open_to(serve(public_ca), **level).startswith("TLS"), "the MX host's own name"
    out = open_to(serve(public_ca, name="other.example"), **level)
    assert out.startswith("refused") and f"a valid certificate for {MX_NAME}" in out, out
    assert open_to(serve(public_ca, name="partner.example"), tls_domain="partner.example", **level).startswith("TLS")
    out = open_to(serve(public_ca), tls_domain="partner.example", **level)
    assert out.startswith("refused") and "partner.example" in out
    assert open_to(serve(trustme.CA()), **level).startswith("refused"), "the right name from an unknown CA"


def test_a_smart_host_password_is_never_sent_in_clear(serve) -> None:
    server = serve(None, credentials={"relay-user": "relay-pass"}, auth_require_tls=False)
    out = open_to(server, username="relay-user", password="relay-pass")
    assert out.startswith("refused") and "never sent in clear" in out


@pytest.mark.parametrize(("changes", "problem"), [
    ({"tls_auth_level": "DomainValidation"}, "tls_auth_level: needs require_tls = true"),
    ({"require_tls": True, "tls_auth_level": "CertificateValidation", "tls_domain": "partner.example"},
     "tls_domain: needs tls_auth_level"),
    ({"require_tls": True, "tls_auth_level": "Strict"}, "tls_auth_level"),
])
def test_the_organization_file_refuses_tls_settings_that_cannot_work(changes, problem) -> None:
    # (the demo's connector says require_tls = false: these settings replace it)
    text = "\n".join(line for line in CONTOSO.read_text().splitlines() if not line.startswith("require_tls ="))
    marker = "[[send_connectors]]\n"
    extra = "".join(f"{k} = {_toml(v)}\n" for k, v in changes.items())
    start = text.index(marker) + len(marker)
    with pytest.raises(ConfigError) as info:
        parse_org(text[:start] + extra + text[start:])
    assert problem in str(info.value), str(info.value)


def _toml(value: object) -> str:
    return "true" if value is True else f'"{value}"'
