"""The categorizer (mailyard.hub.categorizer) on the in-memory queues: recipients resolved
and expanded, limits applied, and the message bifurcated into one item per next hop."""

from __future__ import annotations

from mailyard.hub import categorizer
from mailyard.hub.memory_queues import MemoryQueues
from mailyard.hub.outcomes import Batch
from mailyard.hub.queues import submission_queue
from mailyard.hub.records import Recipient
from mailyard.registry import now_ms
from tests.conftest import make_org
from tests.hub.helpers import StaticHub, message

SUB = submission_queue("Amsterdam")


def _categorize(hub: StaticHub, recipients: list[str], *, size: int = 100, sender: str = "alice@contoso.com") -> str:
    queues = hub.queues
    now = now_ms()
    msg = message(sender, now=now)
    msg.size = size
    change = queues.change().add_message(msg, b"Subject: hello\r\n\r\nhi\r\n", refs=1)
    queues.commit([change.enqueue(SUB, queues.new_item_ids(1)[0], msg, [Recipient(a) for a in recipients], now=now)])
    taken = queues.claim(SUB.identity, worker=hub.worker, n=10, lease_ms=60_000, cap=0, token="t")
    assert taken is not None
    categorizer.categorize(hub, Batch(SUB.identity, "Submission", "Undefined", "t", taken.items, taken.messages))
    return msg.id


def _by_queue(hub: StaticHub, msg_id: str) -> dict[str, list[str]]:
    return {i.queue: sorted(r.address for r in i.recipients) for i in hub.queues.items_of(msg_id)}


def test_a_group_is_expanded_and_split_per_next_hop_each_final_recipient_once() -> None:
    hub = StaticHub(MemoryQueues(), make_org())
    msg_id = _categorize(hub, ["all-staff@contoso.com", "bob@contoso.com"])
    assert _by_queue(hub, msg_id) == {
        "Amsterdam\\MBX-AMS-01": ["alice@contoso.com", "bob@contoso.com"],
        "Amsterdam\\MBX-AMS-02": ["carol@contoso.com", "dave@contoso.com"],
        "Amsterdam\\London": ["erin@contoso.com", "frank@contoso.com"],
    }
    assert hub.queues.members(SUB.identity) == [], "the Submission item is gone"
    assert hub.queues.stored[msg_id].refs == 3, "one reference per item"
    assert {r.event for r in hub.queues.tracked} >= {"EXPAND", "TRANSFER"}


def test_an_unknown_recipient_in_an_accepted_domain_gets_an_ndr_and_the_rest_goes_on() -> None:
    hub = StaticHub(MemoryQueues(), make_org())
    msg_id = _categorize(hub, ["nobody@contoso.com", "bob@contoso.com"])
    assert _by_queue(hub, msg_id) == {"Amsterdam\\MBX-AMS-01": ["bob@contoso.com"]}
    (report,) = hub.queues.items(hub.queues.members(SUB.identity))
    assert [r.address for r in report.recipients] == ["alice@contoso.com"]
    fail = next(r for r in hub.queues.tracked if r.event == "FAIL")
    assert fail.recipients == ["nobody@contoso.com"] and "5.1.1" in fail.recipient_status[0]


def test_an_external_address_goes_to_its_domain_queue_and_without_a_connector_to_unreachable() -> None:
    hub = StaticHub(MemoryQueues(), make_org())
    msg_id = _categorize(hub, ["grace@fabrikam.example"])
    assert _by_queue(hub, msg_id) == {"Amsterdam\\fabrikam.example": ["grace@fabrikam.example"]}
    (info,) = hub.queues.queues(["Amsterdam\\fabrikam.example"])
    assert (info.kind, info.delivery_type, info.next_hop, info.connector) == (
        "delivery", "DnsConnectorDelivery", "fabrikam.example", "Internet")
    bare = make_org().model_copy(update={"send_connectors": []})
    hub = StaticHub(MemoryQueues(), bare)
    msg_id = _categorize(hub, ["grace@fabrikam.example"])
    (item,) = hub.queues.items_of(msg_id)
    assert item.queue == "Amsterdam\\Unreachable"
    assert "5.4.4" in item.recipients[0].last_error
    assert hub.queues.drains.count("Amsterdam\\Unreachable") == 0, "nothing drains the Unreachable queue"


def test_a_message_over_the_size_limit_is_refused_for_every_recipient() -> None:
    hub = StaticHub(MemoryQueues(), make_org())
    msg_id = _categorize(hub, ["bob@contoso.com"], size=hub.settings.max_message_size + 1)
    assert _by_queue(hub, msg_id) == {}
    fail = next(r for r in hub.queues.tracked if r.event == "FAIL")
    assert "5.3.4" in fail.recipient_status[0]


def test_a_pending_remove_on_a_message_being_categorized_is_honoured() -> None:
    hub = StaticHub(MemoryQueues(), make_org())
    queues = hub.queues
    now = now_ms()
    msg = message(now=now)
    change = queues.change().add_message(msg, b"Subject: hello\r\n\r\nhi\r\n", refs=1)
    queues.commit([change.enqueue(SUB, queues.new_item_ids(1)[0], msg, [Recipient("bob@contoso.com")], now=now)])
    taken = queues.claim(SUB.identity, worker=hub.worker, n=10, lease_ms=60_000, cap=0, token="t")
    assert taken is not None
    (item,) = taken.items
    queues.commit([queues.change().require_status(item, "Active").require_lease(item, "t")
                   .request(item, "PendingRemove", ndr=False)])
    categorizer.categorize(hub, Batch(SUB.identity, "Submission", "Undefined", "t", taken.items, taken.messages))
    assert queues.items_of(msg.id) == [], "not routed anywhere"
    assert queues.request_result(item.id) == "Removed without NDR"
