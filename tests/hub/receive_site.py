"""A hub whose receive connectors the receive tests talk to, and their SMTP client.

Clients from 127.0.0.1 match the ``Default`` connector (the organization's network); clients
from 127.0.0.2 match ``Internet`` (anonymous). ``Limited`` has small limits; ``Apps`` is an
application server's connector, trusted by its one address."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mailyard.org import Organization
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from tests.conftest import ROOT, make_org

HUB = "rx-1"

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
    # (no tarpit: these tests refuse on purpose, and would wait 5 s a refusal; the tarpit is
    # test_receive_abuse's)
    "tarpit_interval": 0,
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


def receive_org() -> Organization:
    """The demo organization with the ``Limited`` and ``Apps`` connectors."""
    return with_connector(with_connector(make_org(), LIMITED), APPS)


@contextmanager
def receive_site(redis_server: RedisServer, data_dir: Path, *, mailboxes: bool = True) -> Iterator[Cluster]:
    """One hub, ``rx-1``, with the receive organization (and Amsterdam's mailbox servers)."""
    cluster = Cluster(redis_server.new_db(), data_dir, receive_org(), cwd=ROOT)
    try:
        if mailboxes:
            cluster.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
        cluster.start_hub("Amsterdam", HUB)
        yield cluster
    finally:
        cluster.close()


def connect(site: Cluster, connector: str = "Default", source: str = "127.0.0.1") -> smtplib.SMTP:
    host, port = site.smtp(HUB, connector)
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
