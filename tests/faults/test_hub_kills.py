"""Hubs killed at the worst moments while mail of every kind flows: the whole worker, or one
pool child, at each stage. A supervisor restarts what died, as ``site up`` and docker
compose do."""

from __future__ import annotations

import time

import pytest

from mailyard import keys

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
    fired = [p for p in HUB_POINTS if world.site.r.exists(keys.fault(p))]
    assert set(fired) == set(HUB_POINTS), f"crash points that never fired: {set(HUB_POINTS) - set(fired)}"
