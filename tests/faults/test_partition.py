"""A partition between the hubs and Redis (a loopback proxy that stops forwarding, without
closing anything), and a half-open one that loses Redis's replies (a BRPOP reply vanishes,
and with it a Celery message): after healing, everything accepted arrives, once."""

from __future__ import annotations

import time

import pytest

from mailyard.testing.proxy import Proxy
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["blackhole", "drop_replies"])
def test_hubs_cut_off_from_redis_recover_when_the_network_heals(world_factory, tmp_path, mode) -> None:
    redis = RedisServer(tmp_path / "redis", databases=2).start()
    proxy = Proxy("127.0.0.1", redis.port, password=redis.password).start()
    try:
        world = world_factory(redis=redis, hub_redis_url=proxy.url(0), hubs_per_site=1)
        stream = world.stream(f"partition-{mode}").run(28, interval=0.1)
        wait_until(lambda: len(stream.sent) >= 8, timeout=60)
        proxy.set_mode(mode)
        time.sleep(6.0)  # the partition lasts six seconds: longer than a lease and a heartbeat
        proxy.set_mode("forward")
        proxy.reset()  # connections that went silent are dropped, as a real network would
        started = time.monotonic()
        stream.wait_sent()
        verdict = stream.verdict(started)
        assert verdict.sent >= 20 and proxy.dropped > 0
    finally:
        proxy.stop()
