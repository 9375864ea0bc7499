"""The store driver's client of mailbox servers: mutual TLS, and the server it reaches is the
one it meant, whatever address the registry gives and whatever connection is pooled. Real
mailbox servers over HTTPS, real certificates of the organization's CA."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mailyard import pki, registry
from mailyard.errors import TransientDeliveryError
from mailyard.hub.mailbox_client import MailboxClient
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from tests.conftest import ROOT, make_org

RAW = b"Subject: through the client\r\n\r\nx\r\n"


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(redis_server.new_db(), tmp_path_factory.mktemp("client"), make_org(), cwd=ROOT)
    try:
        cluster.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
        yield cluster
    finally:
        cluster.close()


def client(site: Cluster, hub_site: str = "Amsterdam") -> MailboxClient:
    return MailboxClient(site.r, "client-test", pki.NodeCert(site.pki.dir, pki.Identity.hub(hub_site)))


def test_a_hub_of_the_site_delivers_and_one_of_another_site_is_refused(site: Cluster) -> None:
    ours = client(site)
    try:
        (result,) = ours.deliver("MBX-AMS-01", [("c1", ["alice@contoso.com"], RAW)])
        assert result.code == 250, result.reply
    finally:
        ours.close()
    theirs = client(site, "London")
    try:
        with pytest.raises(TransientDeliveryError, match="answered 403"):
            theirs.deliver("MBX-AMS-01", [("c2", ["alice@contoso.com"], RAW)])
    finally:
        theirs.close()


def test_a_pooled_connection_to_one_server_never_carries_requests_meant_for_another(site: Cluster) -> None:
    ours = client(site)
    try:
        (first,) = ours.deliver("MBX-AMS-01", [("c3", ["alice@contoso.com"], RAW)])
        assert first.code == 250
        # MBX-AMS-02 stops; its registry entry is then made to point at MBX-AMS-01's address
        site.kill("MBX-AMS-02")
        registry.register_server(site.r, "MBX-AMS-02", registry.server_url(site.r, "MBX-AMS-01"), "Amsterdam")
        with pytest.raises(TransientDeliveryError, match="cannot reach mailbox server MBX-AMS-02"):
            ours.deliver("MBX-AMS-02", [("c4", ["carol@contoso.com"], RAW)])
        assert not [i for i in site.folder("alice@contoso.com") if i["id"] == "c4"]
    finally:
        ours.close()
