"""Processes killed at the worst moments, while mail of every kind flows: hubs (the whole
worker, or one pool child) at each stage, mailbox servers during delivery and submission,
and the hub that holds the sweeper's lease. A supervisor restarts what died, as ``site up``
and docker compose do."""

from __future__ import annotations

import time

import pytest

from mailyard import keys
from mailyard.testing.waiting import wait_until

HUB_POINTS = ("pickup.stored", "categorize.before_commit", "deliver.after_api", "send.before_connect",
              "send.after_data")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hub", "child"])
def test_hubs_killed_at_every_stage_while_mail_flows(world_factory, mode) -> None:
    faults = ",".join(f"{point}={mode}" for point in HUB_POINTS)
    world = world_factory(faults=faults)
    stream = world.stream(f"hub-kills-{mode}").run(32, interval=0.1)
    stream.wait_sent()
    started = time.monotonic()
    stream.verdict(started)
    fired = [p for p in HUB_POINTS if world.site.r.exists(f"my:fault:{p}")]
    assert set(fired) == set(HUB_POINTS), f"crash points that never fired: {set(HUB_POINTS) - set(fired)}"


@pytest.mark.slow
def test_mailbox_servers_killed_during_delivery_and_submission(world_factory) -> None:
    world = world_factory()
    for server in ("MBX-AMS-01", "MBX-AMS-02", "MBX-LON-01"):
        world.site.kill(server, stay_down=True)
        world.site.start_mailbox(server, faults="mailbox.deliver.stored=child,mailbox.outbox.stored=child")
    stream = world.stream("mailbox-kills").run(28, interval=0.1)
    stream.wait_sent()
    stream.verdict(time.monotonic())
    for point in ("mailbox.deliver.stored", "mailbox.outbox.stored"):
        assert world.site.r.exists(f"my:fault:{point}"), f"{point} never fired"


@pytest.mark.slow
def test_the_hub_holding_the_sweeper_lease_is_killed(world_factory) -> None:
    world = world_factory()
    holder = wait_until(lambda: world.site.r.get(keys.SWEEPER), timeout=30).decode()
    stream = world.stream("sweeper-kill").run(24, interval=0.1)
    wait_until(lambda: len(stream.sent) >= 6, timeout=60)
    world.site.kill(holder, stay_down=True)
    new = wait_until(lambda: (h := world.site.r.get(keys.SWEEPER)) and h.decode() != holder and h.decode(),
                     timeout=30, message="no other hub took the sweeper lease")
    assert new != holder
    stream.wait_sent()
    stream.verdict(time.monotonic())
