"""A replicated Redis under Sentinel (mailyard.site.redis_group), with real servers and
Sentinels: every kind of Mailyard client follows a failover without being restarted, and a
node that lost its data comes back as a replica, never as an empty primary."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailyard import redisconn, scripts
from mailyard.site import redis_group
from mailyard.site.redis_group import Layout, Primary, ReplicaOf, Wait
from mailyard.testing.redis_group import RedisGroup
from mailyard.testing.waiting import wait_until

pytestmark = pytest.mark.slow
DEADLINE = 90.0  # generous: a failover takes about two seconds here


@pytest.fixture
def group(tmp_path: Path) -> Iterator[RedisGroup]:
    g = RedisGroup(tmp_path / "redis", replicas=2).start()
    yield g
    g.stop()


def test_a_new_group_starts_node_0_as_primary_and_the_others_as_its_replicas(group: RedisGroup) -> None:
    assert group.wait_settled() == 0
    assert [group.role(i) for i in range(3)] == ["master", "slave", "slave"]


def test_every_member_keeps_its_password_and_files_to_itself(group: RedisGroup) -> None:
    for d in [group.layout.node_dir(0), group.layout.sentinel_dir(0)]:
        assert d.stat().st_mode & 0o777 == 0o700, d
    conf = group.layout.sentinel_dir(0) / redis_group.SENTINEL_CONF
    assert conf.stat().st_mode & 0o077 == 0, "sentinel.conf holds the password"
    import redis
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=group.layout.sentinel_ports[0], socket_timeout=2, retry=redis_group.NO_RETRY).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=group.layout.node_ports[1], socket_timeout=2, retry=redis_group.NO_RETRY).ping()


def test_a_client_follows_the_loss_of_the_primary_machine_and_a_lua_script_still_runs(group: RedisGroup) -> None:
    r = group.client()
    r.set("before", "1")
    assert r.execute_command("WAIT", 1, 5000) >= 1
    old = group.wait_settled()
    group.kill_node(old, lose_data=True)
    # The same client: its next commands wait through the failover (no restart, no new client).
    assert r.incr("after") == 1
    new = group.primary()
    assert new is not None and new != old, "a replica was promoted"
    assert r.get("before") == b"1", "what a replica had when it was acknowledged survives the machine"
    # A script loaded on the old primary is unknown to the new one: EVALSHA falls back to loading it.
    assert scripts.script(r, "lease") is not None
    assert r.eval("return redis.call('INCR', KEYS[1])", 1, "after") == 2


def test_an_asyncio_client_follows_a_failover_too(group: RedisGroup) -> None:
    async def run() -> tuple[int, int]:
        r = redisconn.connect_async(group.url())
        first = await r.incr("n")
        old = group.wait_settled()
        await asyncio.to_thread(group.kill_node, old)
        second = await r.incr("n")
        await r.aclose()
        return first, second

    assert group.layout is not None
    first, second = asyncio.run(run())
    assert (first, second) in ((1, 2), (1, 1)), "one increment may be lost only if it was never replicated"


def test_clients_follow_a_primary_that_went_silent_without_closing_anything(group: RedisGroup) -> None:
    # A stopped process (SIGSTOP) keeps its connections open and accepts new ones, and answers
    # nothing: what a partition looks like from the client's side. A client that reconnects
    # to the address it had (redis-py's own Sentinel-managed connection, on a command's retry)
    # stays there for as long as its retries last, minutes; ours asks the Sentinels each time.
    sync_client = group.client()
    sync_client.set("before", "1")
    async_client = redisconn.connect_async(group.url())
    loop = asyncio.new_event_loop()
    assert loop.run_until_complete(async_client.incr("n")) == 1
    old = group.wait_settled()
    node = group.nodes[old]
    assert node is not None
    node.send_signal(signal.SIGSTOP)
    try:
        results: dict[str, object] = {}

        def sync_incr() -> None:
            results["sync"] = sync_client.incr("after")

        thread = threading.Thread(target=sync_incr, daemon=True)
        thread.start()
        got = loop.run_until_complete(asyncio.wait_for(async_client.incr("n"), timeout=DEADLINE))
        thread.join(DEADLINE)
        assert not thread.is_alive(), "the sync client is still waiting for the silent primary"
        assert results["sync"] == 1 and got in (1, 2)
        new = group.wait_failover(old)
        assert sync_client.get("before") == b"1"
        assert redisconn.text(sync_client.info("replication")["role"]) == "master", "on the new primary"
        assert new != old
    finally:
        node.send_signal(signal.SIGCONT)
        loop.run_until_complete(async_client.aclose())
        loop.close()
        sync_client.close()


def test_a_node_that_lost_its_data_rejoins_as_a_replica_with_the_data(group: RedisGroup) -> None:
    r = group.client()
    for i in range(100):
        r.set(f"k{i}", i)
    assert r.execute_command("WAIT", 2, 5000) == 2
    old = group.wait_settled()
    group.kill_node(old, lose_data=True)
    new = group.wait_failover(old)
    group.start_node(old)
    assert group.wait_settled() == new
    assert group.role(old) == "slave"
    import redis
    replica = redis.Redis.from_url(group.node_url(old))
    assert replica.get("k99") == b"99", "the returned node copied the new primary's data"


def test_an_empty_node_that_the_sentinels_still_call_primary_waits_for_the_failover(tmp_path: Path) -> None:
    layout = Layout(tmp_path, [1, 2], [3, 4, 5])
    for i in (0, 1):
        layout.node_dir(i).mkdir(parents=True)
    (layout.node_dir(1) / "appendonly.aof").write_bytes(b"*1\r\n$4\r\nPING\r\n")
    # No Sentinel answers and none has a file: a new group's primary is node 0.
    assert redis_group.start_role(layout, 0, None) == Primary()
    assert redis_group.start_role(layout, 1, None) == ReplicaOf("127.0.0.1", 1)


def test_with_a_sentinel_answering_node_0_lost_its_data_it_waits(group: RedisGroup) -> None:
    old = group.wait_settled()
    group.kill_node(old, lose_data=True)
    # Asked at once, before the Sentinels have voted, the empty node must not start as primary.
    role = redis_group.start_role(group.layout, old, group.password)
    assert isinstance(role, Wait | ReplicaOf), role
    if isinstance(role, Wait):
        assert "lost its data" in role.reason
    new = group.wait_failover(old)
    assert redis_group.start_role(group.layout, old, group.password) == ReplicaOf(
        "127.0.0.1", group.layout.node_ports[new])


def test_a_primary_without_replicas_refuses_writes(tmp_path: Path) -> None:
    import redis

    from mailyard.testing.waiting import wait_until
    g = RedisGroup(tmp_path / "redis", replicas=1).start()
    try:
        primary = redis.Redis.from_url(g.node_url(0), retry=redis_group.NO_RETRY)
        primary.set("x", 1)
        g.kill_node(1)

        def refused() -> bool:
            try:
                primary.set("x", 2)
            except redis.ResponseError as exc:
                return "NOREPLICAS" in str(exc)
            return False

        wait_until(refused, timeout=30, message="the primary refusing writes once its only replica is gone")
        g.start_node(1)
        g.wait_settled()

        def taken() -> bool:  # (the settled group counts the replica good once it has synced and acked)
            try:
                return bool(primary.set("x", 3))
            except redis.ResponseError as exc:
                assert "NOREPLICAS" in str(exc), exc
                return False
        wait_until(taken, timeout=60, message="writes are taken again once a replica is back")
    finally:
        g.stop()


def test_celery_reaches_the_primary_through_the_sentinels_after_a_failover(group: RedisGroup) -> None:
    from mailyard.broker import make_app
    app = make_app(group.url())
    with app.connection_for_write() as conn:
        q = conn.SimpleQueue("mailyard.test")
        q.put({"n": 1})
        assert group.client().execute_command("WAIT", 1, 5000) >= 1
        old = group.wait_settled()
        group.kill_node(old)
        group.wait_failover(old)

        def get() -> Any:
            # As a worker does: reconnect and ask again while the Sentinels are unsure (on a
            # loaded machine one may see the new primary as down for a moment: MasterNotFound).
            conn.ensure_connection(max_retries=30)
            return conn.SimpleQueue("mailyard.test").get(timeout=5)
        got = wait_until(get, timeout=DEADLINE, message="Celery's connection did not reach the new primary")
        assert got.payload == {"n": 1}
        got.ack()
