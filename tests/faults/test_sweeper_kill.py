"""The hub that holds the sweeper's lease is killed while mail flows: another hub takes the
lease over and nothing stalls for longer than a lease."""

from __future__ import annotations

import time

import pytest

from mailyard import keys
from mailyard.testing.waiting import wait_until


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
