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
