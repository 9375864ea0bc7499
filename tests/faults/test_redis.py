"""Redis is killed (SIGKILL) in the middle of a stream and restarted from its AOF
(``appendfsync always``): every accepted message still arrives, exactly once at mailboxes.
Celery 5.7 workers may exit when Redis goes away; the supervisor restarts them."""

from __future__ import annotations

import time

import pytest

from mailyard.testing.waiting import wait_until


@pytest.mark.slow
def test_redis_killed_and_restarted_from_its_aof_loses_nothing(world_factory) -> None:
    world = world_factory()
    stream = world.stream("redis-kill").run(40, interval=0.1)
    wait_until(lambda: len(stream.sent) >= 12, timeout=60)
    world.redis.kill()
    time.sleep(1.0)  # the outage: Redis is down for a second (a fault's duration, not a wait)
    world.redis.start()  # same port, same directory: it loads the AOF
    started = time.monotonic()
    stream.wait_sent()
    verdict = stream.verdict(started)
    assert verdict.sent >= 30
