"""The Edge's copy of the organization (mailyard.edge.organization): its one site and receive
connector, and Exchange's Edge defaults where the organization kept the hub's."""

from __future__ import annotations

from mailyard.edge.organization import edge_organization
from mailyard.edgesync import config_push
from tests.conftest import make_org


def test_the_edge_runs_one_site_of_its_own_with_exchanges_edge_connector_and_defaults() -> None:
    org = make_org().model_copy(update={"transport": make_org().transport.model_copy(
        update={"transient_failure_retry_interval": 300, "outbound_connection_failure_retry_interval": 45})})
    push = config_push(org, "Amsterdam", "EDGE-01", ["127.0.0.1:2525"], now=0)
    edge = edge_organization(push, name="EDGE-01", fqdn="edge-01.example", smtp="127.0.0.9:25", salt="s")
    assert [s.name for s in edge.sites] == ["EDGE-01"] and edge.mailboxes == []
    (rc,) = edge.receive_connectors
    assert rc.name == "Default internal receive connector EDGE-01" and rc.bindings == ["127.0.0.9:25"]
    assert set(rc.permission_groups) == {"AnonymousUsers", "ExchangeServers", "Partners"}
    assert (rc.connection_timeout, rc.connection_inactivity_timeout) == (300, 60)
    assert edge.transport.transient_failure_retry_interval == 600, "the Edge's default, where the hub's was kept"
    assert edge.transport.outbound_connection_failure_retry_interval == 45, "a value the organization set stays"
    assert edge.edge is not None and edge.edge.site == "Amsterdam" and edge.edge.hubs == ["127.0.0.1:2525"]
    assert edge.send_connectors[0].name == "EdgeSync - Inbound to Amsterdam"
    assert [a.space for a in edge.send_connectors[0].address_spaces] == list(org.accepted_domains)


def test_an_edge_with_dns_servers_of_its_own_uses_them_and_otherwise_the_organizations() -> None:
    org = make_org().model_copy(update={"transport": make_org().transport.model_copy(
        update={"dns_servers": ["10.0.0.53"]})})
    push = config_push(org, "Amsterdam", "EDGE-01", ["127.0.0.1:2525"], now=0)
    own = edge_organization(push, name="EDGE-01", fqdn="e.example", smtp="127.0.0.9:25", salt="s",
                            dns_servers=["192.0.2.53:53"])
    assert own.transport.dns_servers == ["192.0.2.53:53"]
    theirs = edge_organization(push, name="EDGE-01", fqdn="e.example", smtp="127.0.0.9:25", salt="s")
    assert theirs.transport.dns_servers == ["10.0.0.53"]


def test_rspamd_takes_dns_servers_only_as_addresses() -> None:
    import pytest

    from mailyard.edge.rspamd import nameserver

    assert nameserver("127.0.0.1:5300") == '"127.0.0.1:5300"' and nameserver("10.0.0.53") == '"10.0.0.53:53"'
    assert nameserver("[::1]:53") == '"[::1]:53"'
    for bad in ('1.2.3.4"; evil', "dns.example:53", "127.0.0.1:0", "127.0.0.1:x"):
        with pytest.raises(ValueError):
            nameserver(bad)
