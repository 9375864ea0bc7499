"""Guarded transactions: build a state change in Python, apply it atomically in Redis.

Every change of a message's state is one ``Txn``: guards (for example "I still hold this
item's lease") checked and operations applied in one Lua call (core/lua/txn.lua), so a crash
between two writes cannot happen and a worker that lost its lease cannot overwrite the one
that took the item over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgpack
import redis
import redis.asyncio

from mailyard import durability, keys
from mailyard.broker import DrainMessages
from mailyard.scripts import execute, execute_async, script, script_async

Word = str | bytes | int | float


@dataclass
class Result:
    ok: bool
    failed_guard: int = 0  # 1-based number of the guard that failed
    value: bytes | None = None  # the guarded key's value, for "absent" guards on strings
    kicked: list[str] = field(default_factory=list)  # queues whose drain task this step queued


class Txn:
    def __init__(self) -> None:
        self._guards: list[list[Word]] = []
        self._ops: list[list[Word]] = []
        self._kicks: list[str] = []

    # guards
    def guard_eq(self, key: str, field_: str, value: Word) -> Txn:
        self._guards.append(["eq", key, field_, value])
        return self

    def guard_absent(self, key: str) -> Txn:
        self._guards.append(["absent", key])
        return self

    def guard_no_field(self, key: str, field_: str) -> Txn:
        """The hash ``key`` has no ``field_`` (a once-only step, safe to send twice)."""
        self._guards.append(["hnx", key, field_])
        return self

    def guard_score_at_most(self, key: str, member: str, score: int) -> Txn:
        """``member`` is in the sorted set ``key``, its score at most ``score``."""
        self._guards.append(["zle", key, member, score])
        return self

    def guard_exists(self, key: str) -> Txn:
        self._guards.append(["exists", key])
        return self

    # operations
    def op(self, *words: Word) -> Txn:
        self._ops.append(list(words))
        return self

    def hset(self, key: str, mapping: dict[str, Word]) -> Txn:
        words: list[Word] = ["HSET", key]
        for k, v in mapping.items():
            words += [k, v]
        self._ops.append(words)
        return self

    def hset_if_exists(self, key: str, mapping: dict[str, Word]) -> Txn:
        words: list[Word] = ["@hset_if", key]
        for k, v in mapping.items():
            words += [k, v]
        self._ops.append(words)
        return self

    def decref(self, msg_id: str) -> Txn:
        """One item fewer holds the message; the last one deletes it and its body."""
        self._ops.append(
            ["@decref", keys.msg(msg_id), keys.body(msg_id), keys.msg_items(msg_id), keys.DELAY, msg_id]
        )
        return self

    def kick(self, drains: DrainMessages, queue: str, celery_queue: str, *, force: bool = False) -> Txn:
        """Queue a drain task for ``queue`` on the Celery queue ``celery_queue`` unless one is pending
        already (``force``: even then). The transaction itself pushes the Celery message, so
        making a queue non-empty and asking for its drain are one atomic step; this is the
        only way Mailyard kicks a queue."""
        celery_list, message = drains.build(queue, celery_queue)
        self._ops.append(["@kick", keys.kick(queue), drains.ttl_ms, celery_list, message, int(force)])
        self._kicks.append(queue)
        return self

    def extend(self, ops: Iterable[list[Word]]) -> Txn:
        self._ops.extend(list(op) for op in ops)
        return self

    @property
    def empty(self) -> bool:
        return not self._ops

    def argv(self) -> list[bytes]:
        """One MessagePack argument (core/lua/txn.lua): far cheaper to send than hundreds of
        separate arguments. (Integers arrive in Lua as numbers, exact to 2^53, which holds
        every id, size and millisecond time used here.)"""
        # use_bin_type=False: the raw type of the MessagePack that Redis's cmsgpack reads.
        return [msgpack.packb([self._guards, self._ops], use_bin_type=False)]

    def _result(self, reply: list) -> Result:
        if int(reply[0]) == 1:
            kicked = [q for q, flag in zip(self._kicks, reply[1:], strict=True) if int(flag) == 1]
            return Result(True, kicked=kicked)
        return Result(False, int(reply[1]), reply[2] or None)

    def run(self, r: redis.Redis) -> Result:
        return self._result(script(r, "txn")(keys=[], args=self.argv()))

    async def run_async(self, r: redis.asyncio.Redis) -> Result:
        return self._result(await script_async(r, "txn")(keys=[], args=self.argv()))


def run_all(r: redis.Redis, txns: list[Txn], *, replicated: bool = False) -> list[Result]:
    """Apply several transactions in one round trip; each is atomic on its own. ``replicated``:
    and wait, in that round trip, until a replica has them (``durability.NotReplicated`` if
    none confirms: applied on the primary, but not to be acknowledged)."""
    if not txns:
        return []
    s = script(r, "txn")
    need = 0

    def fill(pipe: redis.client.Pipeline) -> None:
        nonlocal need
        for t in txns:
            s(keys=[], args=t.argv(), client=pipe)
        if replicated:
            need = durability.append_wait(pipe)
    replies = execute(r, fill)
    if replicated:
        replies, refused = durability.verdict(replies, need)
        if refused:
            raise durability.NotReplicated(refused)
    return [t._result(reply) for t, reply in zip(txns, replies, strict=True)]


class GroupCommit:
    """For asyncio servers: transactions of concurrent sessions go to Redis together, one
    pipeline per round trip (a group commit). Each round trip costs this machine far more
    CPU than the transaction itself; with 20 sessions at work most share one. Each
    transaction stays atomic on its own; the order is arrival order. A ``replicated`` one
    makes its round trip end with a WAIT (one for the whole group), and raises
    ``durability.NotReplicated`` when no replica confirmed it."""

    def __init__(self, r: redis.asyncio.Redis) -> None:
        self._r = r
        self._pending: list[tuple[Txn, asyncio.Future[Result], bool]] = []
        self._flushing = False

    async def run(self, txn: Txn, *, replicated: bool = False) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((txn, future, replicated))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                run = script_async(self._r, "txn")
                wait = any(replicated for _, _, replicated in batch)
                need = 0

                async def fill(pipe: redis.asyncio.client.Pipeline) -> None:
                    nonlocal need
                    for txn, _, _ in batch:  # noqa: B023 (used before the loop moves on)
                        await run(keys=[], args=txn.argv(), client=pipe)  # noqa: B023
                    if wait:  # noqa: B023
                        need = durability.append_wait(pipe)
                try:
                    replies = await execute_async(self._r, fill)
                except Exception as exc:
                    for _, future, _ in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                refused = None
                if wait:
                    replies, refused = durability.verdict(replies, need)
                for (txn, future, replicated), reply in zip(batch, replies, strict=True):
                    if future.done():
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    elif refused and replicated:
                        future.set_exception(durability.NotReplicated(refused))
                    else:
                        future.set_result(txn._result(reply))
        finally:
            self._flushing = False
