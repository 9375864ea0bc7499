"""The machine that holds Redis's primary is lost in the middle of a stream of mail (SIGKILL
and its data directory deleted), with the site on a replicated Redis under Sentinel and
``durability = "replica"``: every message that was acknowledged arrives, exactly once at
mailboxes; the site carries on against the promoted replica without restarting anything;
the replaced machine rejoins as a replica."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mailyard.testing.redis_group import RedisGroup
from mailyard.testing.waiting import wait_until


@pytest.mark.slow
def test_the_primarys_machine_lost_mid_stream_loses_nothing_and_nobody_restarts(world_factory, tmp_path: Path) -> None:
    # Two replicas: the Sentinels may promote either, so every acknowledged write must be on
    # both (WAIT for every online replica; with WAIT 1, 2 of 40 messages were lost here in 1
    # run of 7). The promoted one keeps the other and takes writes at once.
    group = RedisGroup(tmp_path / "redis-group", replicas=2, databases=2).start()
    try:
        world = world_factory(redis=group, durability="replica")
    except BaseException:
        group.stop()
        raise
    # From here the fixture stops the group, after the site: hubs whose Redis is gone would
    # wait out their shutdown timeout.
    pids = {name: proc.pid for name, proc in world.site.procs.items()}
    stream = world.stream("primary-lost").run(40, interval=0.1)
    wait_until(lambda: len(stream.sent) >= 12, timeout=60, message="the stream getting going")
    old = group.wait_settled()
    group.kill_node(old, lose_data=True)
    stream.mark(f"node {old} killed, its data deleted")
    new = group.wait_failover(old)
    stream.mark(f"node {new} promoted")
    started = time.monotonic()
    group.start_node(old)  # the machine replaced, empty: it must come back as a replica
    stream.mark(f"node {old} started again, empty")
    stream.wait_sent()
    verdict = stream.verdict(started)
    assert verdict.sent >= 30, f"the site stopped taking mail after the failover: {verdict.line()}"
    assert group.wait_settled() == new, "the promoted replica stays primary"
    assert group.role(old) == "slave", "the replaced machine rejoined as a replica"
    restarted = {n for n, proc in world.site.procs.items() if pids.get(n) != proc.pid}
    assert not restarted, f"these processes had to be restarted to follow the failover: {sorted(restarted)}"
