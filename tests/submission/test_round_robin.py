"""The Mail Submission Service kicks the live hubs of the site in turn, and a kicked hub takes
the server's waiting Outbox items in batches."""

from __future__ import annotations

from collections import Counter

from mailyard import keys, tracking
from mailyard.testing.waiting import wait_until
from tests.conftest import make_org


def pickups_by_hub(r, subjects: set[str]) -> Counter:
    return Counter(rec.server for rec in tracking.search(r, event="RECEIVE") if rec.subject in subjects)


def test_thirty_messages_spread_over_three_hubs_and_a_killed_hub_drops_out(cluster_factory) -> None:
    # Given a site with three hubs
    site = cluster_factory()
    site.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
    hubs = [site.start_hub("Amsterdam", f"rr-{i}", wait=False) for i in (1, 2, 3)]
    for hub in hubs:
        site.wait_hub(hub)

    # When 30 messages are sent
    first = {f"rr first {i}" for i in range(30)}
    for s in sorted(first):
        site.send("alice@contoso.com", ["carol@contoso.com"], subject=s)
    wait_until(lambda: first <= set(site.subjects("carol@contoso.com")), timeout=60,
               message=lambda: f"missing {sorted(first - set(site.subjects('carol@contoso.com')))}")

    # Then every hub picked up some of them
    counts = pickups_by_hub(site.r, first)
    assert set(counts) == {"rr-1", "rr-2", "rr-3"}, f"pickups per hub: {dict(counts)}"
    assert sum(counts.values()) == 30

    # When one hub is killed, it leaves the rotation within the heartbeat timeout
    site.kill("rr-2")
    wait_until(lambda: "rr-2" not in site.live_hubs("Amsterdam"), timeout=30,
               message="rr-2 still counted as alive")
    second = {f"rr second {i}" for i in range(20)}
    for s in sorted(second):
        site.send("alice@contoso.com", ["carol@contoso.com"], subject=s)

    # Then the next messages all go to the others, and none is lost or doubled
    wait_until(lambda: second <= set(site.subjects("carol@contoso.com")), timeout=60,
               message=lambda: f"missing {sorted(second - set(site.subjects('carol@contoso.com')))}")
    later = pickups_by_hub(site.r, second)
    assert "rr-2" not in later and sum(later.values()) == 20, dict(later)
    inbox = Counter(site.subjects("carol@contoso.com"))
    assert all(inbox[s] == 1 for s in first | second), {s: n for s, n in inbox.items() if n != 1}
    assert not site.r.zcard(keys.submit_pending("MBX-AMS-01")), "every pickup was acknowledged"


def test_with_no_hub_alive_the_message_waits_in_the_outbox_then_goes(cluster_factory) -> None:
    # Given a site whose mailbox servers run but no hub does (and hubs that take 10 at once)
    site = cluster_factory(make_org(batch_size=10))
    site.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
    site.send("bob@contoso.com", ["dave@contoso.com"], subject="waiting for a hub")

    # Then the message stays in the Outbox (Exchange: it does not leave the mailbox)
    wait_until(lambda: site.subjects("bob@contoso.com", "Outbox") == ["waiting for a hub"], timeout=10)
    assert site.subjects("dave@contoso.com") == []

    # ...and so do the next ones, a backlog of more than one batch
    backlog = [f"backlog {i}" for i in range(25)]
    for s in backlog:
        site.send("bob@contoso.com", ["dave@contoso.com"], subject=s)

    # When a hub starts, they go at once, each once
    site.start_hub("Amsterdam", "late-hub")
    site.wait_for_subject("dave@contoso.com", "waiting for a hub")
    site.wait_for_subject("bob@contoso.com", "waiting for a hub", folder="Sent Items")
    wait_until(lambda: set(backlog) <= set(site.subjects("dave@contoso.com")), timeout=60,
               message=lambda: f"dave has {site.subjects('dave@contoso.com')}")
    wait_until(lambda: site.subjects("bob@contoso.com", "Outbox") == [], timeout=30)
    assert Counter(site.subjects("dave@contoso.com")) == Counter(["waiting for a hub", *backlog])
    assert sorted(site.subjects("bob@contoso.com", "Sent Items")) == sorted(["waiting for a hub", *backlog])
    assert not site.r.zcard(keys.submit_pending("MBX-AMS-02")), "every pickup was acknowledged"
