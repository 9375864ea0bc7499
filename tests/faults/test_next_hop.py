"""Next hops that misbehave: one that accepts the connection and then says nothing, one that
goes silent after the final dot, and one that drops the connection after DATA (the message
arrived, the reply did not: the one duplicate SMTP itself cannot avoid, counted)."""

from __future__ import annotations

import time

import pytest

from mailyard.internet.sink import Mode
from mailyard.testing.waiting import wait_until


@pytest.mark.slow
@pytest.mark.parametrize("mode", [Mode.STALL_GREETING, Mode.STALL_AFTER_DATA, Mode.DROP_AFTER_DATA])
def test_a_next_hop_that_stalls_or_drops_costs_time_not_mail(world_factory, mode) -> None:
    world = world_factory(smtp_inactivity_timeout=3, hubs_per_site=1)
    world.sink.set_mode(mode, times=2)  # misbehaves twice, then recovers
    stream = world.stream(f"next-hop-{mode.value}").run(16, interval=0.1)
    stream.wait_sent()
    verdict = stream.verdict(time.monotonic())
    if mode is Mode.DROP_AFTER_DATA:
        # each dropped reply can make one message arrive twice, never more
        assert verdict.duplicates <= 2
    else:
        assert verdict.duplicates <= (2 if mode is Mode.STALL_AFTER_DATA else 0)
    wait_until(lambda: world.sink.mode is Mode.ACCEPT, timeout=5)
