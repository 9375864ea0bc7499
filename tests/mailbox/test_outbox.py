"""The mailbox server's index of its Outbox items: oldest first, each held by one hub at a time."""

from __future__ import annotations

from mailyard.mailbox.outbox import OutboxIndex


def test_items_are_taken_oldest_first_up_to_the_limit_and_held_by_one_taker() -> None:
    index = OutboxIndex()
    index.load([("bob@contoso.com", "1700000002.M2.h"), ("alice@contoso.com", "1700000001.M1.h")])
    index.add("carol@contoso.com", "1700000003.M3.h")
    assert index.take(2, lease_s=60) == [("alice@contoso.com", "1700000001.M1.h"), ("bob@contoso.com", "1700000002.M2.h")]
    assert index.take(10, lease_s=60) == [("carol@contoso.com", "1700000003.M3.h")], "the first two are held"
    assert index.take(10, lease_s=60) == []


def test_a_lease_that_ends_or_is_released_lets_another_hub_take_the_item() -> None:
    index = OutboxIndex()
    index.add("alice@contoso.com", "1.M1.h")
    index.add("bob@contoso.com", "2.M2.h")
    assert len(index.take(10, lease_s=0)) == 2
    assert len(index.take(10, lease_s=60)) == 2, "a lease of 0 s is over at once"
    index.release([("bob@contoso.com", "2.M2.h")])
    assert index.take(10, lease_s=60) == [("bob@contoso.com", "2.M2.h")]


def test_a_removed_item_is_gone_and_adding_twice_keeps_one() -> None:
    index = OutboxIndex()
    index.add("alice@contoso.com", "1.M1.h")
    index.add("alice@contoso.com", "1.M1.h")
    assert len(index) == 1 and index.items() == [("alice@contoso.com", "1.M1.h")]
    index.remove("alice@contoso.com", "1.M1.h")
    index.remove("alice@contoso.com", "1.M1.h")
    assert len(index) == 0 and index.take(10, lease_s=60) == []
