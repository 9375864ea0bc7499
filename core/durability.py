"""Acknowledge only what a replica has (transport setting ``durability``; DESIGN §2.4, §7).

With ``replica``, every Redis write that precedes an acknowledgement to a peer (the SMTP
``250`` after DATA, the mailbox API's ``202`` for a Send, the store driver's pickup
acknowledgement) ends its pipeline with ``WAIT <n> <ms>``: Redis answers once ``n`` replicas
have everything this connection wrote, in the same round trip as the write. ``n`` is every
replica the primary has online (at least one): the Sentinels promote the replica whose offset
they last saw best, which need not be the one that answered first, so a write only one of two
replicas had could be lost with the primary's machine. A replica that stops answering without
disconnecting holds acknowledgements back until it has been silent ``REPLICA_MAX_LAG_S``
(Redis's own ``min-replicas-max-lag``); then it is no longer waited for (and, behind the
others, it is not the one promoted). A primary's machine lost after that loses nothing
acknowledged. When no replica confirms in time, or the primary
refuses the write (``min-replicas-to-write``: ``NOREPLICAS``), the caller does not
acknowledge: SMTP ``451 4.3.0``, the API ``503`` with ``Retry-After``, the pickup leaves its
items in the Outbox. What was written may still be on the primary; each way in makes a retry
harmless (relay and pickup dedup keys, the Outbox's Message-ID).

Every ack point goes through ``append_wait`` and ``verdict`` (or ``unreplicated`` for an error),
so this is the one place that knows how a write is confirmed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

from mailyard import keys
from mailyard.org import Durability

WAIT_REPLICAS = 1  # replicas that must confirm a write, at least (every online one: ``needed``)
REPLICA_MAX_LAG_S = 10  # a replica silent longer is not waited for (Redis's min-replicas-max-lag)
COUNT_TTL_S = 1.0  # how long a client trusts the count of online replicas it read
WAIT_TIMEOUT_MS = 5000  # then the write counts as unconfirmed: a temporary refusal
RETRY_AFTER_S = 5  # what the API's 503 tells a client
AUTO_RECHECK_S = 10.0  # "auto" that found no replica looks again this often
# PUBLISH on a channel nobody reads is replicated and allowed under NOREPLICAS, so it moves
# this connection's replication offset to "now": WAIT then also covers a write that a
# dedup guard found already done by an earlier, unconfirmed attempt (which wrote nothing now).
FENCE_CHANNEL = keys.DURABILITY_FENCE


@dataclass(frozen=True)
class Unreplicated:
    """A write no replica confirmed: it must not be acknowledged. ``reason`` goes into replies."""

    reason: str


NOT_CONFIRMED = Unreplicated(f"no replica confirmed the write within {WAIT_TIMEOUT_MS // 1000} s")
REFUSED = Unreplicated("Redis refuses writes: no replica connected and answering (NOREPLICAS)")


class NotReplicated(Exception):
    """Raised where a caller expects results (``txn.run_all``, ``txn.GroupCommit``)."""

    def __init__(self, outcome: Unreplicated) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


def append_wait(pipe: redis.client.Pipeline | redis.asyncio.client.Pipeline) -> int:
    """End a (non-transactional) pipeline with the fence and ``WAIT`` for every online replica
    (as ``replicated`` last counted them for this client): two replies, read by ``verdict``
    with the number returned. (Buffered commands: nothing to await, for either kind.)"""
    need = needed(pipe.connection_pool)
    pipe.pipeline_execute_command("PUBLISH", FENCE_CHANNEL, "")
    pipe.pipeline_execute_command("WAIT", need, WAIT_TIMEOUT_MS)
    return need


def verdict(replies: list[Any], need: int) -> tuple[list[Any], Unreplicated | None]:
    """A pipeline's replies after ``append_wait``: those of the writes, and None when the
    ``need`` replicas confirmed them (else why not). Works with ``raise_on_error=False``."""
    *writes, _fence, acked = replies
    if isinstance(acked, Exception):  # (a replica asked to WAIT, a failover midway)
        return writes, unreplicated(acked) or Unreplicated(f"no replica confirmed the write ({acked})")
    if int(acked) >= need:
        return writes, None
    if int(acked) == 0:
        return writes, NOT_CONFIRMED
    return writes, Unreplicated(f"{acked} of {need} replicas confirmed the write within {WAIT_TIMEOUT_MS // 1000} s")


def unreplicated(error: BaseException) -> Unreplicated | None:
    """The refusal that ``error`` means (None: not a replication matter). A write refused under
    ``min-replicas-to-write`` is ``NOREPLICAS ...``, from a script too; a pipeline that raises
    puts "Command # n (...) of pipeline caused error: " in front."""
    if isinstance(error, NotReplicated):
        return error.outcome
    if isinstance(error, redis.ResponseError) and re.search(r"(^|: )NOREPLICAS\b", str(error)):
        return REFUSED
    return None


# region: how many replicas to wait for

def online_replicas(replication: Mapping[str, Any]) -> int:
    """The replicas in a primary's ``INFO replication`` that are online and have acknowledged
    within ``REPLICA_MAX_LAG_S`` (``slave<n>: state=online,...,lag=<s>``, parsed by redis-py)."""
    return sum(1 for name, value in replication.items()
               if re.fullmatch(r"slave\d+", name) and isinstance(value, Mapping)
               and value.get("state") == "online" and int(value.get("lag", 0)) <= REPLICA_MAX_LAG_S)


# per connection pool (what a pipeline knows of its client): (replicas to wait for, read at)
_counts: dict[int, tuple[int, float]] = {}


def needed(pool: object) -> int:
    """How many replicas a write on this pool waits for: every online one, at least one."""
    found = _counts.get(id(pool))
    return max(WAIT_REPLICAS, found[0]) if found else WAIT_REPLICAS


def _count_is_fresh(r: redis.Redis | redis.asyncio.Redis) -> bool:
    found = _counts.get(id(r.connection_pool))
    return found is not None and time.monotonic() - found[1] < COUNT_TTL_S


def _count(r: redis.Redis | redis.asyncio.Redis, replication: Mapping[str, Any]) -> None:
    _counts[id(r.connection_pool)] = (online_replicas(replication), time.monotonic())


def _count_now(r: redis.Redis) -> None:
    if not _count_is_fresh(r):
        try:
            _count(r, r.info("replication"))
        except redis.RedisError:
            pass  # (the write itself says what is wrong; the count is read again next time)


async def _count_now_async(r: redis.asyncio.Redis) -> None:
    if not _count_is_fresh(r):
        try:
            _count(r, await r.info("replication"))
        except redis.RedisError:
            pass

# endregion


# region: which setting applies

def decide(setting: Durability, *, sentinel: bool, replication: Mapping[str, Any] | None) -> bool:
    """Whether writes wait for a replica. ``auto`` means ``replica`` for a Sentinel-managed
    primary, or when the primary's ``INFO replication`` shows a connected replica or
    ``min-replicas-to-write`` set (the ``min_slaves_good_slaves`` field is there only then);
    otherwise ``local``. (``INFO``, not ``CONFIG GET``: managed Redis services disable CONFIG.)"""
    if setting != "auto":
        return setting == "replica"
    if sentinel:
        return True
    if replication is None:
        return False
    return int(replication.get("connected_slaves", 0)) > 0 or "min_slaves_good_slaves" in replication


def _is_sentinel(r: redis.Redis | redis.asyncio.Redis) -> bool:
    # What a redis+sentinel:// URL becomes (mailyard.redisconn.connect): no URL needed here.
    return isinstance(r.connection_pool, redis.sentinel.SentinelConnectionPool
                      | redis.asyncio.sentinel.SentinelConnectionPool)


# "auto" per client: once it found replicas it stays ``replica`` (a replica that dies must not
# turn acknowledgements local, the very moment they matter); ``local`` is looked at again.
_auto: dict[int, tuple[bool, float]] = {}


def _cached(r: object) -> bool | None:
    found = _auto.get(id(r))
    if found is None:
        return None
    replica, at = found
    return replica if replica or time.monotonic() - at < AUTO_RECHECK_S else None


def replicated(setting: Durability, r: redis.Redis) -> bool:
    """Whether writes on ``r`` wait for replicas under ``setting`` (a transport setting); when
    they do, the count of replicas to wait for is current (``needed``, read at most every
    ``COUNT_TTL_S``)."""
    if (wait := _setting(setting, r)) is None:
        try:
            info = None if _is_sentinel(r) else r.info("replication")
        except redis.RedisError:
            return False  # (Redis unreachable: the write fails anyway; decided on the next call)
        wait = _decided(setting, r, info)
    if wait:
        _count_now(r)
    return wait


async def replicated_async(setting: Durability, r: redis.asyncio.Redis) -> bool:
    """``replicated`` for an asyncio client."""
    if (wait := _setting(setting, r)) is None:
        try:
            info = None if _is_sentinel(r) else await r.info("replication")
        except redis.RedisError:
            return False
        wait = _decided(setting, r, info)
    if wait:
        await _count_now_async(r)
    return wait


def _setting(setting: Durability, r: object) -> bool | None:
    """What ``setting`` means without asking Redis (None: ``auto``, not known yet)."""
    return setting == "replica" if setting != "auto" else _cached(r)


def _decided(setting: Durability, r: redis.Redis | redis.asyncio.Redis, info: Mapping[str, Any] | None) -> bool:
    _auto[id(r)] = (found := decide(setting, sentinel=_is_sentinel(r), replication=info), time.monotonic())
    if info is not None:
        _count(r, info)
    return found

# endregion
