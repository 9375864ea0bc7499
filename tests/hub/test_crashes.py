"""SIGKILL a hub at each stage of the pipeline: every message still arrives, exactly once.

Crash points (mailyard.faults) kill the process at the worst moment, once: after the
message is stored but before the pickup is acknowledged; while categorizing, before the
result is committed; before the mailbox server is called; after it delivered, before the
hub recorded it. ``hub`` kills the worker's main process and the pool child; ``child``
kills only the pool child running the task.

Copies are counted only once the site is quiet (mailyard.testing.quiet): the redelivery a
crash causes comes after the first copy arrived, and deduplication is what it tests.
"""

from __future__ import annotations

from collections import Counter

import pytest

from mailyard import keys
from mailyard.testing.cluster import Cluster
from mailyard.testing.quiet import wait_quiet
from mailyard.testing.waiting import wait_until
from tests.conftest import make_org

pytestmark = pytest.mark.slow  # each test runs a site through a crash or a hanging next hop


def outbox_of(site: Cluster, *senders: str):
    """For wait_quiet: the senders' Outboxes that still hold messages."""
    def busy() -> list[str]:
        return [f"{who}'s Outbox holds {held}" for who in senders if (held := site.subjects(who, "Outbox"))]
    return busy


POINTS = ["pickup.taken", "pickup.stored", "categorize.before_commit", "deliver.before_api", "deliver.after_api"]


@pytest.mark.parametrize("mode", ["hub", "child"])
@pytest.mark.parametrize("point", POINTS)
def test_a_hub_killed_mid_stage_loses_and_duplicates_nothing(cluster_factory, point: str, mode: str) -> None:
    site = cluster_factory(make_org(lease_time=4))
    site.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
    hubs = [site.start_hub("Amsterdam", f"crash-{i}", faults=f"{point}={mode}", wait=False) for i in (1, 2)]
    for hub in hubs:
        site.wait_hub(hub)

    subjects = [f"{point} {mode} {i}" for i in range(6)]
    for s in subjects:
        site.send("alice@contoso.com", ["carol@contoso.com", "bob@contoso.com"], subject=s)

    def arrived() -> bool:
        return set(subjects) <= set(site.subjects("carol@contoso.com")) and set(subjects) <= set(
            site.subjects("bob@contoso.com"))

    wait_until(arrived, timeout=90, message=lambda: f"carol has {site.subjects('carol@contoso.com')}, "
               f"bob has {site.subjects('bob@contoso.com')}")
    assert site.r.exists(keys.fault(point)), f"the crash point {point} never fired"
    # Every redelivery is over (leases expired and returned, retries done, pickups
    # acknowledged, Outbox empty): only now can a second copy no longer arrive.
    wait_quiet(site.r, also=outbox_of(site, "alice@contoso.com"))
    for who in ("carol@contoso.com", "bob@contoso.com"):
        counts = Counter(site.subjects(who))
        assert all(counts[s] == 1 for s in subjects), f"{who}: {dict(counts)}"
    sent = Counter(site.subjects("alice@contoso.com", "Sent Items"))
    assert all(sent[s] == 1 for s in subjects), dict(sent)
    if mode == "hub":
        assert sum(not site.procs[h.name].alive for h in hubs) == 1, "exactly one hub was killed"


def test_killing_hubs_during_a_stream_loses_nothing(cluster_factory) -> None:
    site = cluster_factory(make_org(lease_time=4))
    site.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
    for i in (1, 2):
        site.start_hub("Amsterdam", f"stream-{i}", wait=False)
    for i in (1, 2):
        site.wait_hub(site.procs[f"stream-{i}"])

    subjects = [f"stream {i}" for i in range(40)]
    for i, s in enumerate(subjects):
        site.send("bob@contoso.com", ["dave@contoso.com"], subject=s)
        if i == 15:
            site.kill("stream-1")
        if i == 25:
            site.start_hub("Amsterdam", "stream-3", wait=False)
    wait_until(lambda: set(subjects) <= set(site.subjects("dave@contoso.com")), timeout=90,
               message=lambda: f"missing {sorted(set(subjects) - set(site.subjects('dave@contoso.com')))}")
    wait_quiet(site.r, also=outbox_of(site, "bob@contoso.com"))
    counts = Counter(site.subjects("dave@contoso.com"))
    assert all(counts[s] == 1 for s in subjects), dict(counts)
