"""Queue and message management, with Exchange 2010's semantics (Suspend-Queue,
Resume-Queue, Retry-Queue, Suspend-Message, Resume-Message, Remove-Message, Export-Message).

The CLI and the Queue Viewer's JSON API both act through these functions, so they behave
the same. Every change is one guarded transaction; a message being delivered right now is
not touched: it is marked PendingSuspend or PendingRemove, and the action applies if the
delivery fails and the message would go back into its queue.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from mailyard import keys, tracking
from mailyard.broker import KICK_TTL_MS
from mailyard.errors import NotFoundError, StateError
from mailyard.hub import dsn
from mailyard.hub.bounce import queue_report, wants_report
from mailyard.hub.node import Node
from mailyard.hub.queues import (
    POISON,
    SUBMISSION,
    UNREACHABLE,
    Item,
    allocate_items,
    forget_item,
    load_bodies,
    load_items,
    load_messages,
    submission_queue,
)
from mailyard.nodes import now_ms
from mailyard.tracking import Event, Record
from mailyard.txn import Txn


@dataclass
class Done:
    """What an action did to one queue or message."""

    identity: str
    result: str  # e.g. "Suspended", "PendingSuspend", "Removed", "Resubmitted"

    def as_dict(self) -> dict[str, str]:
        return {"identity": self.identity, "result": self.result}


def _queue_exists(r: redis.Redis, queue: str) -> None:
    if not r.exists(keys.queue(queue)):
        raise NotFoundError(f"no queue {queue!r}; `mailyard queue list` shows them")


def _route(r: redis.Redis, queue: str) -> str:
    route = r.hget(keys.queue(queue), "route")
    return route.decode() if route else ""


# region: queues


def suspend_queue(node: Node, queue: str) -> Done:
    """No more messages leave the queue; those being delivered finish (Suspend-Queue)."""
    r = node.r
    _queue_exists(r, queue)
    if queue.endswith("\\" + POISON):
        raise StateError("the Poison queue is always suspended; resume or remove its messages instead")
    r.hset(keys.queue(queue), "suspended", 1)
    return Done(queue, "Suspended")


def resume_queue(node: Node, queue: str) -> Done:
    r = node.r
    _queue_exists(r, queue)
    if queue.endswith("\\" + POISON):
        raise StateError("the Poison queue cannot be resumed; resume its messages instead")
    txn = Txn().hset(keys.queue(queue), {"suspended": 0})
    txn.kick(queue, _route(r, queue), KICK_TTL_MS)
    node.commit(txn)
    return Done(queue, "Resumed")


def retry_queue(node: Node, queue: str, *, resubmit: bool = False) -> Done:
    """Try the next hop now (Retry-Queue); with ``resubmit``, send the queue's messages back
    through the categorizer first (required for the Unreachable queue)."""
    r = node.r
    _queue_exists(r, queue)
    if queue.endswith("\\" + UNREACHABLE) and not resubmit:
        raise StateError("the Unreachable queue has no next hop to retry: use --resubmit")
    if resubmit:
        count = resubmit_queue(node, queue)
        return Done(queue, f"Resubmitted {count}")
    if r.hget(keys.queue(queue), "suspended") == b"1":
        raise StateError(f"{queue} is suspended: resume it first")
    txn = Txn().hset(keys.queue(queue), {"next_retry": 0})
    txn.op("DEL", keys.kick(queue))
    txn.kick(queue, _route(r, queue), KICK_TTL_MS)
    node.commit(txn)
    return Done(queue, "Retrying")


def resubmit_queue(node: Node, queue: str) -> int:
    """Move every message of ``queue`` that is not being delivered to the Submission queue."""
    r = node.r
    ids = [i.decode() for i in r.zrange(keys.queue_members(queue), 0, -1)]
    done = 0
    for item in load_items(r, ids):
        if item.status in ("Active", "Suspended") and not item.queue.endswith("\\" + POISON):
            continue  # being delivered, or held by an operator: left as they are
        done += resubmit_item(node, item)
    return done


def resubmit_item(node: Node, item: Item, *, reset_crashes: bool = False) -> bool:
    site = item.queue.split("\\", 1)[0]
    target = submission_queue(site)
    now = now_ms()
    txn = Txn().guard_eq(keys.item(item.id), "status", item.status)
    target.ensure(txn)
    fields: dict[str, str | int] = {"queue": target.identity, "status": "Ready", "pending": "", "next_retry": 0}
    if reset_crashes:
        fields["crashes"] = 0
    txn.hset(keys.item(item.id), fields)
    txn.op("ZREM", keys.queue_members(item.queue), item.id)
    txn.op("LREM", keys.ready(item.queue), 0, item.id)
    txn.op("ZREM", keys.RETRY, item.id)
    txn.op("ZADD", keys.queue_members(target.identity), now, item.id)
    txn.op("RPUSH", keys.ready(target.identity), item.id)
    txn.kick(target.identity, target.route, KICK_TTL_MS)
    return node.commit(txn).ok


# endregion

# region: messages


def find_item(r: redis.Redis, identity: str) -> Item:
    """An item by ``Site\\Queue\\Id``, ``Queue\\Id`` or just ``Id`` (Exchange's forms)."""
    item_id = identity.rsplit("\\", 1)[-1].strip()
    if not item_id.isdigit():
        raise NotFoundError(f"{identity!r} is not a message identity (e.g. Amsterdam\\London\\42 or 42)")
    found = load_items(r, [item_id])
    if not found:
        raise NotFoundError(f"no message {identity!r} in any queue")
    item = found[0]
    if "\\" in identity:
        where = identity.rsplit("\\", 1)[0].lower()
        if where != item.queue.lower() and not item.queue.lower().endswith("\\" + where):
            raise NotFoundError(f"message {item_id} is in {item.queue}, not in {identity.rsplit(chr(92), 1)[0]}")
    return item


def suspend_message(node: Node, item: Item) -> Done:
    ident = f"{item.queue}\\{item.id}"
    queue_name = item.queue.split("\\", 1)[-1]
    if queue_name in (SUBMISSION, POISON):
        raise StateError(f"{ident}: messages in the {queue_name} queue cannot be suspended")
    if item.status == "Suspended":
        return Done(ident, "Suspended")
    txn = Txn().guard_eq(keys.item(item.id), "status", item.status)
    if item.status == "Active":
        txn.hset(keys.item(item.id), {"pending": "PendingSuspend"})
        result = "PendingSuspend"
    else:
        txn.hset(keys.item(item.id), {"status": "Suspended", "pending": ""})
        txn.op("LREM", keys.ready(item.queue), 0, item.id)
        txn.op("ZREM", keys.RETRY, item.id)
        result = "Suspended"
    if not node.commit(txn).ok:
        raise StateError(f"{ident} changed while suspending it; try again")
    return Done(ident, result)


def resume_message(node: Node, item: Item) -> Done:
    ident = f"{item.queue}\\{item.id}"
    if item.queue.endswith("\\" + POISON):
        resubmit_item(node, item, reset_crashes=True)
        return Done(ident, "Resubmitted")
    if item.pending:
        node.r.hset(keys.item(item.id), "pending", "")
        return Done(ident, "Active")
    if item.status != "Suspended":
        raise StateError(f"{ident} is {item.status}, not Suspended")
    txn = Txn().guard_eq(keys.item(item.id), "status", "Suspended")
    txn.hset(keys.item(item.id), {"status": "Ready"})
    txn.op("RPUSH", keys.ready(item.queue), item.id)
    txn.kick(item.queue, _route(node.r, item.queue), KICK_TTL_MS)
    node.commit(txn)
    return Done(ident, "Ready")


def remove_message(node: Node, item: Item, *, ndr: bool = True) -> Done:
    """Remove-Message: with an NDR to the sender by default (never for a report itself)."""
    ident = f"{item.queue}\\{item.id}"
    if item.status == "Active":
        fields = {"pending": "PendingRemove", "remove_ndr": int(ndr)}
        node.r.hset(keys.item(item.id), mapping=fields)
        return Done(ident, "PendingRemove")
    txn = Txn().guard_eq(keys.item(item.id), "status", item.status)
    removal_txn(node, txn, item, ndr=ndr, now=now_ms())
    if not node.commit(txn).ok:
        raise StateError(f"{ident} changed while removing it; try again")
    return Done(ident, "Removed" + ("" if ndr else " without NDR"))


def removal_txn(node: Node, txn: Txn, item: Item, *, ndr: bool, now: int) -> None:
    """Operations that remove ``item`` (and NDR its recipients when ``ndr``)."""
    forget_item(txn, item)
    msg = load_messages(node.r, [item.msg]).get(item.msg)
    if msg is None:
        return
    failures = [dsn.Failure(r.address, dsn.REMOVED, r.original) for r in item.recipients]
    tracking.add(txn, Record(Event.FAIL, source="ADMIN", server=node.name, internal_id=msg.id,
                             message_id=msg.message_id, recipients=[f.recipient for f in failures],
                             recipient_status=[f.diagnostic for f in failures], sender=msg.sender,
                             subject=msg.subject, size=msg.size, queue=item.queue,
                             context="removed by an administrator" + ("" if ndr else " without NDR")),
                 node.settings.message_tracking_log_max_age, now)
    if ndr and wants_report(msg):
        body = load_bodies(node.r, [msg.id]).get(msg.id, b"")
        (report_id,) = allocate_items(node.r, 1)
        queue_report(node, txn, msg, body, failures, item_id=report_id, now=now,
                     site=item.queue.split("\\", 1)[0])


def export_message(node: Node, item: Item) -> bytes:
    """The RFC 5322 text of a suspended (or poison) message (Export-Message)."""
    ident = f"{item.queue}\\{item.id}"
    if item.status != "Suspended":
        raise StateError(f"{ident} is {item.status}: suspend it before exporting it")
    body = load_bodies(node.r, [item.msg]).get(item.msg)
    if body is None:
        raise NotFoundError(f"{ident} has no stored content")
    return body


# endregion


# region: the operator's entry points (CLI and Queue Viewer)


def admin_node(redis_url: str, name: str = "admin") -> Node:
    """A Node for acting from outside the hubs (the CLI, the Queue Viewer)."""
    import socket

    from mailyard.broker import make_app

    return Node(name=f"{name}@{socket.gethostname().split('.')[0]}", site="", redis_url=redis_url,
                app=make_app(redis_url))


QUEUE_ACTIONS = ("suspend", "resume", "retry")
MESSAGE_ACTIONS = ("suspend", "resume", "remove")


@dataclass
class Outcome:
    done: list[Done]
    failed: list[tuple[str, str]]  # (identity, why)

    def as_dict(self) -> dict[str, object]:
        return {"count": len(self.done), "done": [d.as_dict() for d in self.done],
                "failed": [{"identity": i, "error": e} for i, e in self.failed]}


def act_on_queues(node: Node, action: str, queues: list[str], *, resubmit: bool = False) -> Outcome:
    if action not in QUEUE_ACTIONS:
        raise StateError(f"unknown queue action {action!r}: use {', '.join(QUEUE_ACTIONS)}")
    out = Outcome([], [])
    for queue in queues:
        try:
            if action == "suspend":
                out.done.append(suspend_queue(node, queue))
            elif action == "resume":
                out.done.append(resume_queue(node, queue))
            else:
                out.done.append(retry_queue(node, queue, resubmit=resubmit))
        except (NotFoundError, StateError) as exc:
            out.failed.append((queue, str(exc)))
    return out


def act_on_messages(node: Node, action: str, identities: list[str], *, ndr: bool = True) -> Outcome:
    if action not in MESSAGE_ACTIONS:
        raise StateError(f"unknown message action {action!r}: use {', '.join(MESSAGE_ACTIONS)}")
    out = Outcome([], [])
    for identity in identities:
        try:
            item = find_item(node.r, identity)
            if action == "suspend":
                out.done.append(suspend_message(node, item))
            elif action == "resume":
                out.done.append(resume_message(node, item))
            else:
                out.done.append(remove_message(node, item, ndr=ndr))
        except (NotFoundError, StateError) as exc:
            out.failed.append((identity, str(exc)))
    return out


# endregion
