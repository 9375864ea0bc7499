"""The runner: one Celery drain task works through one queue, with the stage that queue
kind calls for (DESIGN §2.2). Every stage the pipeline has is in ``STAGES`` below.

A drain takes batches of ready items under a lease (``MailQueues.claim``) and hands each
to its stage, which reports outcomes (mailyard.hub.outcomes). The queue's kick marker
means "a drain is pending or running": while it is set, new arrivals send no Celery
message (under load one drain task carries thousands of messages). The running drain
keeps the marker alive; when it finds the queue empty it removes the marker and looks once
more, so an arrival in between is never stranded. If the worker dies, the marker expires
and the sweeper sends a new drain.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import redis

from mailyard.broker import DRAIN_BUDGET
from mailyard.hub import categorizer, send, store_driver
from mailyard.hub.node import Node
from mailyard.hub.outcomes import Batch, crashed
from mailyard.hub.queues import QueueInfo
from mailyard.hub.records import DeliveryType, QueueKind
from mailyard.org import TransportSettings

log = logging.getLogger("mailyard.hub.runner")


@dataclass(frozen=True)
class Stage:
    """The pipeline stage that drains one kind of queue."""

    name: str
    run: Callable[[Node, Batch], None]
    cap: Callable[[TransportSettings], int]  # how many workers may drain one queue at once (0: any)


CATEGORIZER = Stage("categorizer", categorizer.categorize, lambda s: 0)
MAILBOX_DELIVERY = Stage("store driver", store_driver.deliver, lambda s: s.max_concurrent_mailbox_deliveries)
SMTP_SEND = Stage("send connector", send.deliver, lambda s: s.max_per_domain_outbound_connections)

# Queue kind (and, for delivery queues, Exchange's DeliveryType) -> its stage. The
# Unreachable and Poison queues have none: their mail waits for an operator (or, for
# Unreachable, for an organization change; the sweeper resubmits it then).
STAGES: dict[QueueKind | DeliveryType, Stage] = {
    QueueKind.SUBMISSION: CATEGORIZER,
    DeliveryType.MAPI: MAILBOX_DELIVERY,
    DeliveryType.REMOTE_SITE: SMTP_SEND,
    DeliveryType.DNS: SMTP_SEND,
    DeliveryType.SMART_HOST: SMTP_SEND,
}


def stage_for(info: QueueInfo) -> Stage | None:
    if info.kind is QueueKind.DELIVERY:
        return STAGES.get(DeliveryType(info.delivery_type))
    return STAGES.get(info.kind)


def drain(node: Node, queue: str) -> int:
    """Work through ``queue`` in batches until it is empty, paused or the budget is spent;
    returns how many items were handled."""
    queues = node.queues
    found = queues.queues([queue])
    stage = stage_for(found[0]) if found else None
    if stage is None:
        return 0
    info = found[0]
    settings = node.settings
    token = secrets.token_hex(8)
    lease_ms = int(settings.lease_time * 1000)
    deadline = time.monotonic() + DRAIN_BUDGET
    done = 0
    fanned_out = blocked = False
    try:
        while time.monotonic() < deadline:
            taken = queues.claim(queue, worker=node.worker, n=settings.batch_size, lease_ms=lease_ms,
                                 cap=stage.cap(settings), token=token)
            if taken is None:
                blocked = True  # suspended, in Retry or at its cap: resume, retry or the sweeper kick it
                break
            if not taken.items:
                break
            if not fanned_out and taken.remaining > settings.batch_size:
                # A backlog: another worker joins, up to the cap.
                queues.commit([queues.change().kick(queue, info.celery_queue, force=True)])
                fanned_out = True
            batch = Batch(queue, info.next_hop, info.delivery_type, token, taken.items, taken.messages,
                          info.connector)
            _run_stage(node, stage, batch)
            done += len(taken.items)
        # (when blocked the marker stays: the drains at work keep it alive)
        if not blocked and queues.done_draining(queue):
            # arrived meanwhile, or the budget is spent: a fresh task
            queues.commit([queues.change().kick(queue, info.celery_queue)])
    finally:
        queues.release(queue, token)
    return done


def _run_stage(node: Node, stage: Stage, batch: Batch) -> None:
    """Run the stage; if it raises on a batch, run the items one by one so that only the
    item that fails is counted as crashing (and may become poison), not its neighbours."""
    try:
        stage.run(node, batch)
        return
    except (redis.ConnectionError, redis.TimeoutError):
        # Redis went away under the stage: not the message's fault, so no crash is counted.
        # The task fails; the leases run out and the sweeper returns the items uncounted.
        log.warning("Redis unreachable while %s worked on %s; its items return when their leases expire",
                    stage.name, batch.queue)
        raise
    except Exception as exc:
        if len(batch.items) == 1:
            log.exception("%s failed on item %s of %s", stage.name, batch.items[0].id, batch.queue)
            crashed(node, batch.items, batch.token, f"{type(exc).__name__}: {exc}")
            return
        log.warning("%s failed on a batch of %s (%s); retrying its items one by one",
                    stage.name, batch.queue, exc)
    held = [i for i in node.queues.items([i.id for i in batch.items]) if i.lease == batch.token]
    # An item an operator asked to suspend or remove meanwhile is not tried again: the
    # request applies now, as after any delivery attempt that did not finish it.
    requested = [i for i in held if i.pending]
    if requested:
        crashed(node, requested, batch.token, f"{stage.name} failed on its batch", count=False)
    for item in held:
        if not item.pending:
            _run_stage(node, stage, replace(batch, items=[item]))
