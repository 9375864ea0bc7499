"""The Mail Submission Service kicks the live hubs of the site in turn, and a kicked hub takes
the server's waiting Outbox items in batches."""

from __future__ import annotations

from collections import Counter

from mailyard import keys, tracking
from mailyard.testing.waiting import wait_until
from tests.conftest import make_org


def pickups_by_hub(r, subjects: set[str]) -> Counter:
    return Counter(rec.server for rec in tracking.search(r, event="RECEIVE") if rec.subject in subjects)


def send_one_by_one(site, subjects: list[str]) -> None:
    """Send each once the one before has left alice's Outbox: each then gets a kick of its own
    (mail that comes while a kick is pending goes with that hub's batch)."""
    for s in subjects:
        site.send("alice@contoso.com", ["carol@contoso.com"], subject=s)
        wait_until(lambda: not site.subjects("alice@contoso.com", "Outbox"), timeout=30,
                   message=lambda: f"alice's Outbox holds {site.subjects('alice@contoso.com', 'Outbox')}")


def test_kicks_go_round_the_live_hubs_and_a_killed_hub_drops_out(cluster_factory) -> None:
    # Given a site with three hubs
    site = cluster_factory()
    site.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
    hubs = [site.start_hub("Amsterdam", f"rr-{i}", wait=False) for i in (1, 2, 3)]
    for hub in hubs:
        site.wait_hub(hub)

    # When 9 messages are sent one after another
    first = [f"rr first {i}" for i in range(9)]
    send_one_by_one(site, first)
    wait_until(lambda: set(first) <= set(site.subjects("carol@contoso.com")), timeout=60,
               message=lambda: f"missing {sorted(set(first) - set(site.subjects('carol@contoso.com')))}")

    # Then the hubs picked them up in turn
    counts = pickups_by_hub(site.r, set(first))
    # (3 each, unless a pickup slower than the ack timeout made the sweeper kick another hub)
    assert set(counts) == {"rr-1", "rr-2", "rr-3"} and min(counts.values()) >= 2, f"pickups per hub: {dict(counts)}"

    # When one hub is killed, it leaves the rotation within the heartbeat timeout
    site.kill("rr-2")
    wait_until(lambda: "rr-2" not in site.live_hubs("Amsterdam"), timeout=30,
               message="rr-2 still counted as alive")
    second = [f"rr second {i}" for i in range(6)]
    send_one_by_one(site, second)

    # Then the next messages all go to the others, and none is lost or doubled
    wait_until(lambda: set(second) <= set(site.subjects("carol@contoso.com")), timeout=60,
               message=lambda: f"missing {sorted(set(second) - set(site.subjects('carol@contoso.com')))}")
    later = pickups_by_hub(site.r, set(second))
    assert set(later) == {"rr-1", "rr-3"} and sum(later.values()) == 6, dict(later)
    inbox = Counter(site.subjects("carol@contoso.com"))
    assert all(inbox[s] == 1 for s in first + second), {s: n for s, n in inbox.items() if n != 1}
    assert not site.r.zcard(keys.submit_pending("MBX-AMS-01")), "every pickup was acknowledged"


def test_with_no_hub_alive_the_message_waits_in_the_outbox_then_goes(cluster_factory) -> None:
    # Given a site whose mailbox servers run but no hub does (and hubs that take 10 at once)
    site = cluster_factory(make_org(batch_size=10))
    site.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
    site.send("bob@contoso.com", ["dave@contoso.com"], subject="waiting for a hub")

    # Then the message stays in the Outbox (Exchange: it does not leave the mailbox)
    wait_until(lambda: site.subjects("bob@contoso.com", "Outbox") == ["waiting for a hub"], timeout=10)
    assert site.subjects("dave@contoso.com") == []

    # ...and so do the next ones, a backlog of more than one batch, sent in one request
    backlog = [f"backlog {i}" for i in range(25)]
    response = site.http.post(site.api("bob@contoso.com") + "/outbox/batch", json={"messages": [
        {"to": ["dave@contoso.com"], "subject": s, "body": "hello"} for s in backlog]})
    assert response.status_code == 200, response.text
    assert [r["status"] for r in response.json()["results"]] == [202] * 25, response.text
    registered = site.r.zrange(keys.submit_pending("MBX-AMS-01"), 0, -1)  # (bob's server)
    assert len(registered) == 26, f"the Mail Submission Service registered {len(registered)} of 26 items"

    # When a hub starts, they go at once, each once
    site.start_hub("Amsterdam", "late-hub")
    site.wait_for_subject("dave@contoso.com", "waiting for a hub")
    site.wait_for_subject("bob@contoso.com", "waiting for a hub", folder="Sent Items")
    wait_until(lambda: set(backlog) <= set(site.subjects("dave@contoso.com")), timeout=60,
               message=lambda: f"dave has {site.subjects('dave@contoso.com')}")
    wait_until(lambda: site.subjects("bob@contoso.com", "Outbox") == [], timeout=30)
    assert Counter(site.subjects("dave@contoso.com")) == Counter(["waiting for a hub", *backlog])
    assert sorted(site.subjects("bob@contoso.com", "Sent Items")) == sorted(["waiting for a hub", *backlog])
    assert not site.r.zcard(keys.submit_pending("MBX-AMS-01")), "every pickup was acknowledged"
