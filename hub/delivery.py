"""Draining a queue, and turning delivery outcomes into state (DESIGN §2.2, §2.7).

A drain task takes batches of ready items under a lease and hands each batch to the
queue's stage (categorizer, mailbox delivery, SMTP out). The stage reports outcomes per
recipient; ``settle`` applies them in one guarded transaction per item:

- 2xx: done (DELIVER or SEND in the tracking log);
- 5xx: an NDR for that recipient (FAIL);
- 4xx: the recipient waits ``message_retry_interval`` and is tried again (DEFER);
- a failed connection (``defer_batch``): the items go back to the front of the queue, and
  the whole queue waits on Exchange's retry schedule with its last error shown.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from mailyard import keys, tracking
from mailyard.broker import DRAIN_BUDGET, KICK_TTL_MS
from mailyard.errors import DeliveryError
from mailyard.hub import dsn
from mailyard.hub.admin import removal_txn
from mailyard.hub.bounce import queue_report, wants_report
from mailyard.hub.node import Node
from mailyard.hub.queues import (
    Item,
    Message,
    Recipient,
    allocate_items,
    claim,
    forget_item,
    load_bodies,
    load_items,
    poison_queue,
    rcpts_json,
    release,
)
from mailyard.hub.retry import message_retry_delay, queue_retry_delay
from mailyard.nodes import now_ms
from mailyard.tracking import Event, Record
from mailyard.txn import Kick, Txn

log = logging.getLogger("mailyard.hub.delivery")


@dataclass(frozen=True)
class Batch:
    """What a stage gets: the queue, the lease token and the items it holds."""

    queue: str
    next_hop: str
    delivery_type: str
    token: str
    items: list[Item]
    messages: dict[str, Message]
    connector: str = ""


Stage = Callable[[Node, Batch], None]

_stages: dict[str, Stage] = {}
_caps: dict[str, Callable[[Node], int]] = {}


def register(delivery_type: str, stage: Stage, cap: Callable[[Node], int]) -> None:
    """A stage drains the queues of one DeliveryType; ``cap`` bounds concurrent workers."""
    _stages[delivery_type] = stage
    _caps[delivery_type] = cap


def drain(node: Node, queue: str) -> int:
    """Work through ``queue`` in batches until it is empty, paused or the budget is spent.

    The queue's kick marker means "a drain is pending or running": while it is set, new
    arrivals send no Celery message (under load one drain task carries thousands of
    messages). The running drain keeps the marker alive; when it finds the queue empty it
    removes the marker and looks once more, so an arrival in between is never stranded. If
    the worker dies, the marker expires and the sweeper sends a new drain.
    """
    r = node.r
    info = r.hmget(keys.queue(queue), "type", "next_hop", "route", "connector")
    if info[0] is None:
        return 0
    delivery_type, next_hop, route, connector = ((v or b"").decode() for v in info)
    stage = _stages.get(delivery_type)
    if stage is None or queue.endswith("\\Poison"):
        return 0  # Unreachable and Poison wait for an operator
    marker = keys.kick(queue)
    settings = node.settings
    token = secrets.token_hex(8)
    cap = _caps[delivery_type](node)
    lease_ms = int(settings.lease_time * 1000)
    deadline = time.monotonic() + DRAIN_BUDGET
    done = 0
    fanned_out = blocked = False
    try:
        while time.monotonic() < deadline:
            taken = claim(r, queue, hub=node.name, n=settings.batch_size, lease_ms=lease_ms, cap=cap,
                          token=token)
            if taken is None:
                blocked = True  # suspended, in Retry or at its cap: resume, retry or the sweeper kick it
                break
            if not taken.items:
                break
            if not fanned_out and taken.remaining > settings.batch_size:
                node.kick([Kick(queue, route)])  # a backlog: another worker joins, up to the cap
                fanned_out = True
            batch = Batch(queue, next_hop, delivery_type, token, taken.items, taken.messages, connector)
            _run_stage(node, stage, batch)
            done += len(taken.items)
        if not blocked:  # (when blocked the marker stays: the drains at work keep it alive)
            r.delete(marker)
            if r.llen(keys.ready(queue)):
                _kick(node, queue, route)  # arrived meanwhile, or the budget is spent: a fresh task
    finally:
        release(r, queue, token)
    return done


def _run_stage(node: Node, stage: Stage, batch: Batch) -> None:
    """Run the stage; if it raises on a batch, run the items one by one so that only the
    item that fails is counted as crashing (and may become poison), not its neighbours."""
    try:
        stage(node, batch)
        return
    except Exception as exc:
        if len(batch.items) == 1:
            log.exception("stage failed on item %s of %s", batch.items[0].id, batch.queue)
            crashed(node, batch.items, batch.token, f"{type(exc).__name__}: {exc}")
            return
        log.warning("stage failed on a batch of %s (%s); retrying its items one by one",
                    batch.queue, exc)
    for item in load_items(node.r, [i.id for i in batch.items]):
        if item.lease != batch.token:
            continue  # settled before the failure
        _run_stage(node, stage, replace(batch, items=[item]))


def _kick(node: Node, queue: str, route: str) -> None:
    txn = Txn()
    txn.kick(queue, route, KICK_TTL_MS)
    node.commit(txn)


def _track(node: Node, txn: Txn, record: Record, now: int) -> None:
    tracking.add(txn, record, node.settings.message_tracking_log_max_age, now)


@dataclass(frozen=True)
class Outcome:
    """The next hop's answer for one recipient."""

    code: int
    status: str
    text: str

    @property
    def reply(self) -> str:
        return f"{self.code} {self.status} {self.text}".strip()

    @classmethod
    def of(cls, error: DeliveryError) -> Outcome:
        return cls(error.code, error.status, error.text)


def settle(
    node: Node,
    batch: Batch,
    outcomes: dict[str, dict[str, Outcome]],
    *,
    event: Event = Event.DELIVER,
    source: str = "STOREDRIVER",
    remote: str = "",
) -> None:
    """Apply per-recipient outcomes (``outcomes[item id][address]``) to the batch's items.

    Recipients without an outcome stay as they are and are tried again.
    """
    now = now_ms()
    settings = node.settings
    plans = []
    for item in batch.items:
        msg = batch.messages.get(item.msg)
        got = outcomes.get(item.id, {})
        delivered, failed, remaining = [], [], []
        for rcpt in item.recipients:
            outcome = got.get(rcpt.address)
            if outcome is None:
                remaining.append(rcpt)
            elif outcome.code < 400:
                delivered.append((rcpt, outcome))
            elif outcome.code >= 500:
                failed.append((rcpt, outcome))
            else:
                rcpt.status, rcpt.last_error, rcpt.retries = "Retry", outcome.reply, rcpt.retries + 1
                remaining.append(rcpt)
        if remaining and msg and msg.expires and now >= msg.expires:
            failed += [(r, Outcome(550, "4.4.7", f"QUEUE.Expired; message expired; last error: "
                                                 f"{r.last_error or 'none'}")) for r in remaining]
            remaining = []
        plans.append((item, msg, delivered, failed, remaining))

    reporting = [msg.id for _, msg, _, failed, _ in plans if msg and failed and wants_report(msg)]
    bodies = load_bodies(node.r, reporting)
    report_ids = iter(allocate_items(node.r, len(reporting)))
    txns = []
    for item, msg, delivered, failed, remaining in plans:
        txn = _guarded(item, batch.token)
        if msg is None:  # the message vanished (removed by an operator): drop the husk
            txns.append(txn.op("DEL", keys.item(item.id)).op("ZREM", keys.INFLIGHT, item.id))
            continue
        base = Record(event, source=source, server=node.name, internal_id=msg.id,
                      message_id=msg.message_id, sender=msg.sender, subject=msg.subject,
                      size=msg.size, queue=item.queue, context=remote)
        if delivered:
            _track(node, txn, _with(base, [r for r, _ in delivered], [o.reply for _, o in delivered]), now)
        if failed:
            _track(node, txn, _with(base, [r for r, _ in failed], [o.reply for _, o in failed],
                                    event=Event.FAIL), now)
            if msg.id in bodies:
                queue_report(
                    node, txn, msg, bodies[msg.id],
                    [dsn.Failure(r.address, o.reply, r.original, remote) for r, o in failed],
                    item_id=next(report_ids), now=now,
                )
        if not remaining:
            forget_item(txn, item, claimed=True)
        elif item.pending == "PendingRemove":
            item.recipients = remaining
            removal_txn(node, txn, item, ndr=item.remove_ndr, now=now)
        else:
            deferred = [r for r in remaining if r.status == "Retry"]
            if deferred:
                _track(node, txn, _with(base, deferred, [r.last_error for r in deferred],
                                        event=Event.DEFER), now)
            _park(txn, item, remaining, now + int(message_retry_delay(settings) * 1000),
                  deferred[0].last_error if deferred else item.last_error)
        txns.append(txn)
    if any(delivered for _, _, delivered, _, _ in plans):
        # A delivery worked: the queue leaves Retry and its failure count starts over.
        txns.append(Txn().hset(keys.queue(batch.queue), {"failures": 0, "next_retry": 0, "last_error": "",
                                                          "last_active": now}))
    node.commit_all(txns)


def _with(base: Record, rcpts: list[Recipient], statuses: list[str], *,
          event: Event | None = None) -> Record:
    return replace(base, recipients=[r.address for r in rcpts], recipient_status=statuses,
                   event=event or base.event)


def _guarded(item: Item, token: str) -> Txn:
    return Txn().guard_eq(keys.item(item.id), "lease", token)


def _park(txn: Txn, item: Item, remaining: list[Recipient], due: int, last_error: str) -> None:
    """The item waits for its own retry (or stays suspended if an operator asked for it)."""
    status = "Suspended" if item.pending == "PendingSuspend" else "Retry"
    txn.hset(
        keys.item(item.id),
        {"rcpts": rcpts_json(remaining), "status": status, "retries": item.retries + 1,
         "last_error": last_error, "next_retry": due if status == "Retry" else 0, "pending": ""},
    )
    txn.op("HDEL", keys.item(item.id), "lease", "hub")
    txn.op("ZREM", keys.INFLIGHT, item.id)
    if status == "Retry":
        txn.op("ZADD", keys.RETRY, due, item.id)


def defer_batch(node: Node, batch: Batch, error: DeliveryError, *, source: str = "STOREDRIVER") -> None:
    """The next hop could not be reached: put the items back and send the queue into Retry."""
    now = now_ms()
    settings = node.settings
    r = node.r
    failures = int(r.hget(keys.queue(batch.queue), "failures") or 0) + 1
    next_retry = now + int(queue_retry_delay(settings, failures) * 1000)
    reply = f"{error.code} {error.status} {error.text}"
    txns = []
    for item in reversed(batch.items):
        msg = batch.messages.get(item.msg)
        txn = _guarded(item, batch.token)
        if item.pending == "PendingRemove":
            removal_txn(node, txn, item, ndr=item.remove_ndr, now=now)
            txns.append(txn)
            continue
        for rcpt in item.recipients:
            rcpt.last_error = reply
        status = "Suspended" if item.pending == "PendingSuspend" else "Retry"
        txn.hset(keys.item(item.id), {"status": status, "retries": item.retries + 1,
                                      "last_error": reply, "rcpts": rcpts_json(item.recipients),
                                      "next_retry": next_retry, "pending": ""})
        txn.op("HDEL", keys.item(item.id), "lease", "hub")
        txn.op("ZREM", keys.INFLIGHT, item.id)
        if status == "Retry":
            txn.op("LPUSH", keys.ready(batch.queue), item.id)
        if msg:
            _track(node, txn, Record(Event.DEFER, source=source, server=node.name,
                                     internal_id=msg.id, message_id=msg.message_id,
                                     recipients=[r.address for r in item.recipients],
                                     recipient_status=[reply] * len(item.recipients),
                                     sender=msg.sender, subject=msg.subject, size=msg.size,
                                     queue=item.queue), now)
        txns.append(txn)
    q = Txn()
    q.hset(keys.queue(batch.queue), {"failures": failures, "next_retry": next_retry,
                                     "last_error": reply, "last_retry": now})
    txns.append(q)
    node.commit_all(txns)
    log.info("%s: %s; retry at %s (attempt %d)", batch.queue, reply,
             time.strftime("%H:%M:%S", time.localtime(next_retry / 1000)), failures)


def crashed(node: Node, items: list[Item], token: str, reason: str) -> None:
    """Processing an item raised: count it like a crash; at the poison threshold the item
    moves to the Poison queue instead of failing the hubs forever."""
    now = now_ms()
    txns = []
    for item in items:
        txn = _guarded(item, token)
        poison_or_return(node, txn, item, reason, now)
        txns.append(txn)
    node.commit_all(txns)


def poison_or_return(node: Node, txn: Txn, item: Item, reason: str, now: int, *, crashed: bool = True) -> None:
    """Operations for an item whose processing stopped: back to its queue, or into Poison.
    Only a ``crashed`` worker counts towards the poison threshold (not a stall or a
    partition that merely let the lease run out)."""
    settings = node.settings
    crashes = item.crashes + int(crashed)
    txn.op("HDEL", keys.item(item.id), "lease", "hub")
    txn.op("ZREM", keys.INFLIGHT, item.id)
    if settings.poison_message_detection_enabled and crashes >= settings.poison_threshold:
        spec = poison_queue(item.queue.split("\\", 1)[0])
        spec.ensure(txn)
        txn.hset(keys.item(item.id), {"crashes": crashes, "status": "Suspended",
                                      "queue": spec.identity, "from_queue": item.queue,
                                      "last_error": f"poison: {reason}"})
        txn.op("ZREM", keys.queue_members(item.queue), item.id)
        txn.op("ZADD", keys.queue_members(spec.identity), now, item.id)
        txn.op("ZREM", keys.EXPIRY, item.id)  # poison messages never expire
        _track(node, txn, Record(Event.POISONMESSAGE, source="ROUTING", server=node.name,
                                 internal_id=item.msg, queue=spec.identity,
                                 recipients=[r.address for r in item.recipients],
                                 context=reason[:200]), now)
        log.error("item %s moved to %s after %d crashes: %s", item.id, spec.identity, crashes, reason)
    else:
        txn.hset(keys.item(item.id), {"crashes": crashes, "status": "Ready",
                                      "last_error": (f"processing failed: {reason}" if crashed else reason)[:500]})
        txn.op("LPUSH", keys.ready(item.queue), item.id)
