"""Guarded transactions (mailyard.txn, core/lua/txn.lua) on a real Redis: guards are checked
first and a failing one applies nothing; the special operations do what they say."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio

from mailyard.broker import DrainMessages, make_app
from mailyard.txn import GroupCommit, Txn, run_all


@pytest.fixture
def r(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_a_failing_guard_applies_nothing_and_says_which_failed(r) -> None:
    r.hset("h", "lease", "mine")
    txn = Txn().guard_eq("h", "lease", "mine").guard_eq("h", "lease", "theirs").op("SET", "k", "v")
    result = txn.run(r)
    assert (result.ok, result.failed_guard) == (False, 2)
    assert r.get("k") is None


def test_eq_treats_a_missing_field_as_empty_but_a_missing_hash_fails(r) -> None:
    r.hset("h", "other", "x")
    assert Txn().guard_eq("h", "pending", "").op("SET", "a", 1).run(r).ok
    assert not Txn().guard_eq("gone", "pending", "").op("HSET", "gone", "status", "Ready").run(r).ok
    assert not r.exists("gone"), "a guard on a deleted hash never re-creates it"


def test_absent_carries_the_value_found(r) -> None:
    r.set("dedup", "msg-1")
    result = Txn().guard_absent("dedup").op("SET", "x", 1).run(r)
    assert (result.ok, result.value) == (False, b"msg-1")


def test_decref_deletes_the_message_with_its_last_reference(r) -> None:
    r.hset("my:msg:m", "refs", 2)
    r.set("my:body:m", b"body")
    r.zadd("my:delay", {"m": 1})
    ops = ("my:msg:m", "my:body:m", "my:mi:m", "my:delay", "m")
    Txn().op("@decref", *ops).run(r)
    assert r.exists("my:body:m")
    Txn().op("@decref", *ops).run(r)
    assert not r.exists("my:msg:m", "my:body:m") and r.zscore("my:delay", "m") is None


def test_a_kick_pushes_one_drain_task_while_one_is_pending_unless_forced(r, redis_url: str) -> None:
    drains = DrainMessages(make_app(redis_url))
    first = Txn().kick(drains, "Amsterdam\\Submission", "site.Amsterdam").run(r)
    again = Txn().kick(drains, "Amsterdam\\Submission", "site.Amsterdam").run(r)
    forced = Txn().kick(drains, "Amsterdam\\Submission", "site.Amsterdam", force=True).run(r)
    assert (first.kicked, again.kicked, forced.kicked) == (["Amsterdam\\Submission"], [], ["Amsterdam\\Submission"])
    assert r.llen("my:celery:site.Amsterdam") == 2, "two Celery messages on the site's queue"


def test_hset_if_and_zrem_unless(r) -> None:
    Txn().hset_if_exists("nothing", {"a": 1}).run(r)
    assert not r.exists("nothing")
    r.hset("item", "status", "Retry")
    r.zadd("sched", {"item": 1})
    Txn().op("@zrem_unless", "item", "status", "Retry", "sched", "item").run(r)
    assert r.zscore("sched", "item") is not None
    r.hset("item", "status", "Ready")
    Txn().op("@zrem_unless", "item", "status", "Retry", "sched", "item").run(r)
    assert r.zscore("sched", "item") is None


def test_run_all_keeps_each_transaction_atomic_on_its_own(r) -> None:
    ok = Txn().op("SET", "a", 1)
    refused = Txn().guard_exists("missing").op("SET", "b", 1)
    results = run_all(r, [ok, refused])
    assert [res.ok for res in results] == [True, False]
    assert r.get("a") == b"1" and r.get("b") is None


def test_group_commit_runs_concurrent_sessions_transactions_in_arrival_order(redis_url: str) -> None:
    async def main() -> list[bool]:
        client = redis.asyncio.Redis.from_url(redis_url)
        commits = GroupCommit(client)
        results = await asyncio.gather(*(commits.run(Txn().op("RPUSH", "order", i)) for i in range(50)))
        order = await client.lrange("order", 0, -1)
        await client.aclose()
        assert [int(v) for v in order] == list(range(50))
        return [res.ok for res in results]

    assert all(asyncio.run(main()))


# region: a failover's new primary has none of the scripts (the script cache is not replicated)

@pytest.fixture
def scripts_lost_once(monkeypatch, redis_url: str):
    """The server forgets its scripts after redis-py loaded them for a pipeline and before the
    pipeline runs, once: what a pipeline meets when a failover happens in between."""
    flusher = redis.Redis.from_url(redis_url)
    lost = []

    def forget() -> None:
        if not lost:
            lost.append(True)
            flusher.script_flush()

    load, load_async = redis.client.Pipeline.load_scripts, redis.asyncio.client.Pipeline.load_scripts

    def load_then_forget(self) -> None:
        load(self)
        forget()

    async def load_then_forget_async(self) -> None:
        await load_async(self)
        forget()
    monkeypatch.setattr(redis.client.Pipeline, "load_scripts", load_then_forget)
    monkeypatch.setattr(redis.asyncio.client.Pipeline, "load_scripts", load_then_forget_async)
    yield lost
    flusher.close()


def test_run_all_loads_the_scripts_again_and_applies_each_transaction_once(r, scripts_lost_once) -> None:
    results = run_all(r, [Txn().op("INCR", "n"), Txn().guard_absent("once").op("SET", "once", 1).op("INCR", "n")])
    assert scripts_lost_once, "the scripts were not lost: the test tested nothing"
    assert [x.ok for x in results] == [True, True]
    assert int(r.get("n")) == 2


def test_a_group_commit_loads_the_scripts_again(redis_url: str, r, scripts_lost_once) -> None:
    async def main() -> list[bool]:
        client = redis.asyncio.Redis.from_url(redis_url)
        commits = GroupCommit(client)
        try:
            done = await asyncio.gather(*(commits.run(Txn().op("INCR", "n")) for _ in range(5)))
            return [x.ok for x in done]
        finally:
            await client.aclose()
    assert asyncio.run(main()) == [True] * 5
    assert scripts_lost_once, "the scripts were not lost: the test tested nothing"
    assert int(r.get("n")) == 5

# endregion
