"""The operator's actions on queues and messages, with Exchange 2010's semantics
(Suspend-Queue, Resume-Queue, Retry-Queue, Suspend-Message, Resume-Message, Remove-Message,
Export-Message): a thin façade over the queue contract (mailyard.hub.queues).

The CLI and the Queue Viewer's JSON API both act through these functions, so they behave
the same. Every change is one guarded step, so an action never re-creates an item that was
delivered or removed meanwhile. A message being delivered right now is not touched: it is
marked PendingSuspend or PendingRemove, and the delivery's outcome honours that (a failed
delivery leaves it Suspended, or removes it); ``request_result`` then says what became of
the request, including "delivered: the PendingSuspend came too late".
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mailyard.broker import make_app
from mailyard.errors import NotFoundError, StateError
from mailyard.hub.node import Hub, Node
from mailyard.hub.outcomes import remove_item
from mailyard.hub.queues import DRAINED, QueueInfo, QueueStatus, submission_queue
from mailyard.hub.records import Item, ItemStatus, PendingAction, QueueKind
from mailyard.hub.sweeper import resubmit
from mailyard.registry import now_ms

# How often an action is tried again when the item changed under it (a delivery finished
# or began between reading the item and acting on it).
ATTEMPTS = 5


@dataclass
class Done:
    """What an action did to one queue or message."""

    identity: str
    result: str  # e.g. "Suspended", "PendingSuspend", "Removed", "Resubmitted"

    def as_dict(self) -> dict[str, str]:
        return {"identity": self.identity, "result": self.result}


def _queue(node: Hub, queue: str) -> QueueInfo:
    found = node.queues.queues([queue])
    if not found:
        raise NotFoundError(f"no queue {queue!r}; `mailyard queue list` shows them")
    return found[0]


# region: queues


def suspend_queue(node: Hub, queue: str) -> Done:
    """No more messages leave the queue; those being delivered finish (Suspend-Queue)."""
    info = _queue(node, queue)
    if info.kind is QueueKind.POISON:
        raise StateError("the Poison queue is always suspended; resume or remove its messages instead")
    node.queues.commit([node.queues.change().set_queue(queue, suspended=1)])
    return Done(queue, QueueStatus.SUSPENDED.value)


def resume_queue(node: Hub, queue: str) -> Done:
    info = _queue(node, queue)
    if info.kind is QueueKind.POISON:
        raise StateError("the Poison queue cannot be resumed; resume its messages instead")
    change = node.queues.change().set_queue(queue, suspended=0)
    if info.kind in DRAINED:
        change.kick(queue, info.celery_queue)
    node.queues.commit([change])
    return Done(queue, "Resumed")


def retry_queue(node: Hub, queue: str, *, resubmit_all: bool = False) -> Done:
    """Try the next hop now (Retry-Queue); with ``resubmit_all``, send the queue's messages
    back through the categorizer first (required for the Unreachable queue)."""
    info = _queue(node, queue)
    if info.kind is QueueKind.UNREACHABLE and not resubmit_all:
        raise StateError("the Unreachable queue has no next hop to retry: use --resubmit")
    if info.kind is QueueKind.POISON and not resubmit_all:
        raise StateError("the Poison queue has no next hop to retry: use --resubmit, or resume its messages")
    if resubmit_all:
        return Done(queue, f"Resubmitted {resubmit(node, queue)}")
    if info.suspended:
        raise StateError(f"{queue} is suspended: resume it first")
    node.queues.commit([node.queues.change().set_queue(queue, next_retry=0)
                        .kick(queue, info.celery_queue, force=True)])
    return Done(queue, "Retrying")


# endregion

# region: messages


def find_item(node: Hub, identity: str) -> Item:
    """An item by ``Site\\Queue\\Id``, ``Queue\\Id`` or just ``Id`` (Exchange's forms)."""
    item_id = identity.rsplit("\\", 1)[-1].strip()
    if not item_id.isdigit():
        raise NotFoundError(f"{identity!r} is not a message identity (e.g. Amsterdam\\London\\42 or 42)")
    found = node.queues.items([item_id])
    if not found:
        raise NotFoundError(f"no message {identity!r} in any queue")
    item = found[0]
    if "\\" in identity:
        where = identity.rsplit("\\", 1)[0].lower()
        if where != item.queue.lower() and not item.queue.lower().endswith("\\" + where):
            raise NotFoundError(f"message {item_id} is in {item.queue}, not in {identity.rsplit(chr(92), 1)[0]}")
    return item


def _kind(node: Hub, item: Item) -> QueueKind:
    found = node.queues.queues([item.queue])
    return found[0].kind if found else QueueKind.DELIVERY


def _again(node: Hub, item: Item, ident: str) -> Item:
    """The item changed under the action: read it again (gone: it was delivered or removed)."""
    found = node.queues.items([item.id])
    if not found:
        late = node.queues.request_result(item.id)
        raise NotFoundError(f"{ident} has left its queue meanwhile" + (f" ({late})" if late else
                                                                       " (delivered, or removed)"))
    return found[0]


def _request(node: Hub, item: Item, pending: PendingAction, *, ndr: bool = True) -> bool:
    """Mark an Active item, if it is still held under the lease we saw."""
    change = (node.queues.change().require_status(item, ItemStatus.ACTIVE.value).require_lease(item, item.lease)
              .request(item, pending.value, ndr=ndr))
    return node.queues.commit([change])[0].ok


def suspend_message(node: Hub, item: Item) -> Done:
    ident = item.identity
    if _kind(node, item) in (QueueKind.SUBMISSION, QueueKind.POISON):
        raise StateError(f"{ident}: messages in the {item.queue.rsplit(chr(92), 1)[-1]} queue cannot be suspended")
    for _ in range(ATTEMPTS):
        if item.status == ItemStatus.SUSPENDED:
            return Done(ident, ItemStatus.SUSPENDED.value)
        if item.status == ItemStatus.ACTIVE:
            if _request(node, item, PendingAction.SUSPEND):
                return Done(ident, PendingAction.SUSPEND.value)
        else:
            change = node.queues.change().require_state(item).suspend(item)
            if node.queues.commit([change])[0].ok:
                return Done(ident, ItemStatus.SUSPENDED.value)
        item = _again(node, item, ident)
    raise StateError(f"{ident} kept changing while suspending it; try again")


def resume_message(node: Hub, item: Item) -> Done:
    ident = item.identity
    for _ in range(ATTEMPTS):
        if _kind(node, item) is QueueKind.POISON:
            msg = node.queues.messages([item.msg]).get(item.msg)
            change = (node.queues.change().require_state(item)
                      .move(item, submission_queue(item.site), now=now_ms(), expires=msg.expires if msg else 0,
                            reset_crashes=True))
            if node.queues.commit([change])[0].ok:
                return Done(ident, "Resubmitted")
        elif item.status == ItemStatus.ACTIVE and item.pending:
            if _request(node, item, PendingAction.NONE):
                return Done(ident, ItemStatus.ACTIVE.value)
        elif item.status != ItemStatus.SUSPENDED:
            raise StateError(f"{ident} is {item.status}, not Suspended")
        else:
            change = node.queues.change().require_state(item).resume(item)
            if node.queues.commit([change])[0].ok:
                return Done(ident, ItemStatus.READY.value)
        item = _again(node, item, ident)
    raise StateError(f"{ident} kept changing while resuming it; try again")


def remove_message(node: Hub, item: Item, *, ndr: bool = True) -> Done:
    """Remove-Message: with an NDR to the sender by default (never for a report itself)."""
    ident = item.identity
    for _ in range(ATTEMPTS):
        if item.status == ItemStatus.ACTIVE:
            if _request(node, item, PendingAction.REMOVE, ndr=ndr):
                return Done(ident, PendingAction.REMOVE.value)
        else:
            msg = node.queues.messages([item.msg]).get(item.msg)
            change = node.queues.change().require_state(item)
            remove_item(node, change, item, msg, ndr=ndr, now=now_ms())
            if node.queues.commit([change])[0].ok:
                return Done(ident, "Removed" + ("" if ndr else " without NDR"))
        item = _again(node, item, ident)
    raise StateError(f"{ident} kept changing while removing it; try again")


def wait_for_request(node: Hub, item_id: str, timeout: float) -> str | None:
    """Wait (up to ``timeout`` seconds) for a pending request on an item to be settled, and
    say what became of it; None if its delivery is still going on."""
    deadline = time.monotonic() + timeout
    while True:
        found = node.queues.items([item_id])
        if not found or found[0].status != ItemStatus.ACTIVE:
            result = node.queues.request_result(item_id)
            if result:
                return result
            if found:
                return found[0].status
            return "left its queue"
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def export_message(node: Hub, item: Item) -> bytes:
    """The RFC 5322 text of a suspended (or poison) message (Export-Message)."""
    ident = item.identity
    if item.status != ItemStatus.SUSPENDED:
        raise StateError(f"{ident} is {item.status}: suspend it before exporting it")
    body = node.queues.bodies([item.msg]).get(item.msg)
    if body is None:
        raise NotFoundError(f"{ident} has no stored content")
    return body


# endregion


# region: the operator's entry points (CLI and Queue Viewer)


def admin_node(redis_url: str, name: str = "admin") -> Node:
    """A Node for acting from outside the hubs (the CLI, the Queue Viewer)."""
    import socket

    return Node(name=f"{name}@{socket.gethostname().split('.')[0]}", site="", redis_url=redis_url,
                app=make_app(redis_url))


QUEUE_ACTIONS = ("suspend", "resume", "retry")
MESSAGE_ACTIONS = ("suspend", "resume", "remove")


@dataclass
class ActionReport:
    done: list[Done]
    failed: list[tuple[str, str]]  # (identity, why)

    def as_dict(self) -> dict[str, object]:
        return {"count": len(self.done), "done": [d.as_dict() for d in self.done],
                "failed": [{"identity": i, "error": e} for i, e in self.failed]}


def act_on_queues(node: Hub, action: str, queues: list[str], *, resubmit: bool = False) -> ActionReport:
    if action not in QUEUE_ACTIONS:
        raise StateError(f"unknown queue action {action!r}: use {', '.join(QUEUE_ACTIONS)}")
    out = ActionReport([], [])
    for queue in queues:
        try:
            if action == "suspend":
                out.done.append(suspend_queue(node, queue))
            elif action == "resume":
                out.done.append(resume_queue(node, queue))
            else:
                out.done.append(retry_queue(node, queue, resubmit_all=resubmit))
        except (NotFoundError, StateError) as exc:
            out.failed.append((queue, str(exc)))
    return out


def act_on_messages(node: Hub, action: str, identities: list[str], *, ndr: bool = True,
                    wait: float = 0.0) -> ActionReport:
    """``wait``: for messages being delivered, wait up to that many seconds for the delivery
    to end and report what became of the request instead of Pending…."""
    if action not in MESSAGE_ACTIONS:
        raise StateError(f"unknown message action {action!r}: use {', '.join(MESSAGE_ACTIONS)}")
    out = ActionReport([], [])
    for identity in identities:
        try:
            item = find_item(node, identity)
            if action == "suspend":
                done = suspend_message(node, item)
            elif action == "resume":
                done = resume_message(node, item)
            else:
                done = remove_message(node, item, ndr=ndr)
            out.done.append(done)
        except (NotFoundError, StateError) as exc:
            out.failed.append((identity, str(exc)))
    return await_requests(node, out, wait)


def await_requests(node: Hub, report: ActionReport, wait: float) -> ActionReport:
    """Replace each Pending… result by what became of the request, waiting up to ``wait``
    seconds in all for the deliveries in progress to end."""
    if wait <= 0:
        return report
    deadline = time.monotonic() + wait
    for i, done in enumerate(report.done):
        if done.result.startswith("Pending"):
            settled = wait_for_request(node, done.identity.rsplit("\\", 1)[-1], max(0.0, deadline - time.monotonic()))
            if settled is not None:
                report.done[i] = Done(done.identity, settled)
    return report


# endregion
