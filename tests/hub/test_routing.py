"""Routing (mailyard.hub.routing): Exchange's least-cost send connector selection and the
queue that leads to each resolved recipient's next hop."""

from __future__ import annotations

from typing import Any

from mailyard.directory import Directory
from mailyard.hub.records import DeliveryType, QueueKind
from mailyard.hub.routing import least_cost_connector, next_hop_queue, site_cost
from mailyard.org import Organization
from tests.conftest import make_org


def org_with(connectors: list[dict[str, Any]], **changes: Any) -> Organization:
    data = make_org().model_dump(mode="json")
    data["send_connectors"] = connectors
    data.update(changes)
    return Organization.model_validate(data)


def final(org: Organization, address: str):
    (found,) = Directory(org).expand([address]).finals
    return found


def test_a_mailbox_of_this_site_goes_to_its_servers_queue() -> None:
    org = make_org()
    spec = next_hop_queue(org, "Amsterdam", final(org, "carol@contoso.com"), 100)
    assert (spec.identity, spec.kind, spec.delivery_type) == ("Amsterdam\\MBX-AMS-02", QueueKind.DELIVERY,
                                                              DeliveryType.MAPI)


def test_a_mailbox_of_another_site_goes_to_that_sites_relay_queue() -> None:
    org = make_org()
    spec = next_hop_queue(org, "Amsterdam", final(org, "erin@contoso.com"), 100)
    assert (spec.identity, spec.delivery_type, spec.next_hop) == ("Amsterdam\\London", DeliveryType.REMOTE_SITE,
                                                                  "London")


def test_internet_mail_from_a_site_without_the_connector_is_relayed_to_its_source_site() -> None:
    org = make_org()
    spec = next_hop_queue(org, "London", final(org, "grace@fabrikam.example"), 100)
    assert spec.identity == "London\\Amsterdam", "the Internet connector's source site is Amsterdam"
    here = next_hop_queue(org, "Amsterdam", final(org, "grace@fabrikam.example"), 100)
    assert (here.identity, here.delivery_type, here.connector) == ("Amsterdam\\fabrikam.example",
                                                                  DeliveryType.DNS, "Internet")


def test_the_most_specific_address_space_wins_then_the_lowest_cost() -> None:
    org = org_with([
        {"name": "Any", "address_spaces": ["SMTP:*;1"]},
        {"name": "Sub", "address_spaces": ["SMTP:*.fabrikam.example;5"]},
        {"name": "Exact", "address_spaces": ["SMTP:mail.fabrikam.example;9"]},
        {"name": "Cheap", "address_spaces": ["SMTP:*.fabrikam.example;2"]},
    ])
    pick = lambda domain: least_cost_connector(org, domain, 100, "Amsterdam").connector.name  # noqa: E731
    assert pick("mail.fabrikam.example") == "Exact"
    assert pick("eu.fabrikam.example") == "Cheap", "equally specific: the lower cost"
    assert pick("tailspintoys.example") == "Any"


def test_disabled_and_too_small_connectors_are_passed_over() -> None:
    org = org_with([
        {"name": "Off", "address_spaces": ["SMTP:fabrikam.example;1"], "enabled": False},
        {"name": "Small", "address_spaces": ["SMTP:fabrikam.example;1"], "max_message_size": "1KB"},
        {"name": "Any", "address_spaces": ["SMTP:*;10"]},
    ])
    assert least_cost_connector(org, "fabrikam.example", 100, "Amsterdam").connector.name == "Small"
    assert least_cost_connector(org, "fabrikam.example", 5000, "Amsterdam").connector.name == "Any"


def test_no_connector_means_the_unreachable_queue() -> None:
    org = org_with([])
    assert least_cost_connector(org, "fabrikam.example", 100, "Amsterdam") is None
    spec = next_hop_queue(org, "Amsterdam", final(org, "grace@fabrikam.example"), 100)
    assert (spec.identity, spec.kind) == ("Amsterdam\\Unreachable", QueueKind.UNREACHABLE)


def test_a_smart_host_connector_has_one_queue_for_every_domain() -> None:
    org = org_with([{"name": "Relay", "address_spaces": ["SMTP:*;1"], "dns_routing": False,
                     "smart_hosts": ["relay.example:587"]}])
    a = next_hop_queue(org, "Amsterdam", final(org, "grace@fabrikam.example"), 100)
    b = next_hop_queue(org, "Amsterdam", final(org, "x@tailspintoys.example"), 100)
    assert a == b and (a.identity, a.delivery_type, a.next_hop) == ("Amsterdam\\Relay", DeliveryType.SMART_HOST,
                                                                    "relay.example:587")


def test_site_cost_follows_the_site_links() -> None:
    org = make_org()
    assert site_cost(org, "Amsterdam", "Amsterdam") == (0, 0)
    assert site_cost(org, "Amsterdam", "London") == (10, 1)
