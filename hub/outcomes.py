"""What becomes of a claimed batch: delivery outcomes turned into queue state (DESIGN §2.7).

A stage (categorizer, mailbox delivery, SMTP out) gets a ``Batch`` of items claimed under
one lease and reports what the next hop said, per recipient. Here that becomes one change
per item:

- 2xx: done (DELIVER or SEND in the tracking log);
- 5xx: an NDR for that recipient (FAIL);
- 4xx: the recipient waits ``message_retry_interval`` and is tried again (DEFER);
- the next hop could not be reached (``defer_batch``): the items go back to the front of
  the queue, and the whole queue waits on Exchange's retry schedule with its last error;
- the stage crashed on an item (``crashed``), or its worker died (the sweeper's
  ``reclaim``): back to the queue, or into Poison at the threshold.

An operator's request on an item in flight (PendingSuspend, PendingRemove) is honoured by
every one of these: each change requires the request to be still the one this worker read,
and when an operator got in between, the item is read again and its change built anew. So
a suspend never gets lost, and a delivery that finished anyway is reported as such.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from mailyard.errors import DeliveryError, smtp_reply
from mailyard.hub import dsn
from mailyard.hub.bounce import queue_report
from mailyard.hub.node import Hub
from mailyard.hub.queues import Change, Committed, poison_queue
from mailyard.hub.records import Item, ItemStatus, Message, PendingAction, Recipient
from mailyard.hub.retry import message_retry_delay, queue_retry_delay
from mailyard.registry import now_ms
from mailyard.tracking import Event, Record

log = logging.getLogger("mailyard.hub.outcomes")

# How often a change is rebuilt because an operator's request changed under it; each
# rebuild follows a real admin action, so this bounds nothing a person could do.
REBUILDS = 20


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


@dataclass(frozen=True)
class Outcome:
    """The next hop's answer for one recipient."""

    code: int
    status: str
    text: str

    @property
    def reply(self) -> str:
        return smtp_reply(self.code, self.status, self.text)

    @classmethod
    def of(cls, error: DeliveryError) -> Outcome:
        return cls(error.code, error.status, error.text)


def _commit_honouring_requests(hub: Hub, items: list[Item], token: str,
                               build: Callable[[Item], Change]) -> list[Committed]:
    """Commit ``build(item)`` for each item; where an operator's request changed meanwhile
    (the "pending" guard failed), read the item again and rebuild its change."""
    results = []
    todo = items
    for _ in range(REBUILDS):
        got = hub.queues.commit([build(item) for item in todo])
        results += [res for res in got if res.failed != "pending"]
        again = [item.id for item, res in zip(todo, got, strict=True) if res.failed == "pending"]
        if not again:
            return results
        todo = [i for i in hub.queues.items(again) if i.lease == token]
    log.error("gave up on %d items whose pending action kept changing", len(todo))
    return results


def _record(hub: Hub, msg: Message, event: Event, item: Item, recipients: list[str], statuses: list[str], *,
            source: str, remote: str = "", context: str = "") -> Record:
    return Record(event, source=source, server=hub.name, internal_id=msg.id, message_id=msg.message_id,
                  sender=msg.sender, subject=msg.subject, size=msg.size, queue=item.queue,
                  recipients=recipients, recipient_status=statuses, context=context or remote)


def _too_late(change: Change, item: Item, what: str) -> None:
    if item.pending:
        change.note(item, f"{what}: the {item.pending} came too late")


def settle(hub: Hub, batch: Batch, outcomes: dict[str, dict[str, Outcome]], *, event: Event = Event.DELIVER,
           source: str = "STOREDRIVER", remote: str = "") -> None:
    """Apply per-recipient outcomes (``outcomes[item id][address]``) to the batch's items.
    Recipients without an outcome stay as they are and are tried again."""
    now = now_ms()
    settings = hub.settings
    bodies: dict[str, bytes] = {}  # the originals that reports quote, read when a report is due

    def original_of(msg: Message) -> bytes | None:
        if msg.id not in bodies:
            bodies.update(hub.queues.bodies([msg.id]))
        return bodies.get(msg.id)

    def build(item: Item) -> Change:
        change = hub.queues.change().require_lease(item, batch.token).require_pending(item, item.pending)
        msg = batch.messages.get(item.msg)
        if msg is None:  # the message vanished (removed meanwhile): drop the husk
            return change.complete(item, claimed=True)
        got = outcomes.get(item.id, {})
        delivered: list[tuple[Recipient, Outcome]] = []
        failed: list[tuple[Recipient, Outcome]] = []
        remaining: list[Recipient] = []
        for original in item.recipients:
            rcpt = replace(original)
            outcome = got.get(rcpt.address)
            if outcome is None:
                remaining.append(rcpt)
            elif outcome.code < 400:
                delivered.append((rcpt, outcome))
            elif outcome.code >= 500:
                failed.append((rcpt, outcome))
            else:
                rcpt.status, rcpt.last_error, rcpt.retries = ItemStatus.RETRY.value, outcome.reply, rcpt.retries + 1
                remaining.append(rcpt)
        removing = item.pending == PendingAction.REMOVE
        if remaining and msg.expires and now >= msg.expires and not removing:
            failed += [(r, Outcome(550, "4.4.7", f"QUEUE.Expired; message expired; last error: "
                                                 f"{r.last_error or 'none'}")) for r in remaining]
            remaining = []
        if delivered:
            # A delivery worked: the queue leaves Retry and its failure count starts over, in
            # the same step (no reader sees the message gone and the queue still failing).
            change.set_queue(batch.queue, failures=0, next_retry=0, last_error="", last_active=now)
            change.track(_record(hub, msg, event, item, [r.address for r, _ in delivered],
                                 [o.reply for _, o in delivered], source=source, remote=remote), now)
        if failed:
            change.track(_record(hub, msg, Event.FAIL, item, [r.address for r, _ in failed],
                                 [o.reply for _, o in failed], source=source, remote=remote), now)
            if msg.wants_report and (body := original_of(msg)) is not None:
                queue_report(hub, change, msg, body,
                             [dsn.Failure(r.address, o.reply, r.original, remote) for r, o in failed],
                             item_id=hub.queues.new_item_ids(1)[0], now=now)
        if not remaining:
            _too_late(change, item, "delivered" if delivered else "failed")
            return change.complete(item, claimed=True)
        if removing:
            return remove_item(hub, change, replace(item, recipients=remaining), msg, ndr=item.remove_ndr,
                               now=now, claimed=True)
        deferred = [r for r in remaining if r.status == ItemStatus.RETRY]
        if deferred:
            change.track(_record(hub, msg, Event.DEFER, item, [r.address for r in deferred],
                                 [r.last_error for r in deferred], source=source, remote=remote), now)
        last_error = deferred[0].last_error if deferred else item.last_error
        if item.pending == PendingAction.SUSPEND:
            change.note(item, ItemStatus.SUSPENDED.value)
            return change.park(item, remaining, until=None, last_error=last_error)
        return change.park(item, remaining, until=now + int(message_retry_delay(settings) * 1000),
                           last_error=last_error)

    _commit_honouring_requests(hub, batch.items, batch.token, build)


def defer_batch(hub: Hub, batch: Batch, error: DeliveryError, *, source: str = "STOREDRIVER") -> None:
    """The next hop could not be reached: put the items back and send the queue into Retry."""
    now = now_ms()
    found = hub.queues.queues([batch.queue])
    failures = (found[0].failures if found else 0) + 1
    next_retry = now + int(queue_retry_delay(hub.settings, failures) * 1000)
    reply = smtp_reply(error.code, error.status, error.text)

    def build(item: Item) -> Change:
        change = hub.queues.change().require_lease(item, batch.token).require_pending(item, item.pending)
        msg = batch.messages.get(item.msg)
        recipients = [replace(r, last_error=reply) for r in item.recipients]
        if msg is not None:
            change.track(_record(hub, msg, Event.DEFER, item, [r.address for r in recipients],
                                 [reply] * len(recipients), source=source), now)
        if item.pending == PendingAction.REMOVE:
            return remove_item(hub, change, item, msg, ndr=item.remove_ndr, now=now, claimed=True)
        if item.pending == PendingAction.SUSPEND:
            change.note(item, ItemStatus.SUSPENDED.value)
            return change.park(item, recipients, until=None, last_error=reply)
        return change.put_back(item, status=ItemStatus.RETRY.value, last_error=reply, recipients=recipients,
                               retries=item.retries + 1)

    # (reversed: each goes back to the front, so the batch keeps its order)
    _commit_honouring_requests(hub, list(reversed(batch.items)), batch.token, build)
    hub.queues.commit([hub.queues.change().set_queue(batch.queue, failures=failures, next_retry=next_retry,
                                                     last_error=reply, last_retry=now)])
    log.info("%s: %s; retry at %s (attempt %d)", batch.queue, reply,
             time.strftime("%H:%M:%S", time.localtime(next_retry / 1000)), failures)


def crashed(hub: Hub, items: list[Item], token: str, reason: str, *, count: bool = True) -> None:
    """Processing an item raised: count it like a crash (unless not ``count``); at the poison
    threshold the item moves to the Poison queue instead of failing the hubs forever. An
    operator's request on the item applies now."""
    now = now_ms()

    def build(item: Item) -> Change:
        change = hub.queues.change().require_lease(item, token).require_pending(item, item.pending)
        return stop_processing(hub, change, item, reason, now, crashed=count)

    _commit_honouring_requests(hub, items, token, build)


def stop_processing(hub: Hub, change: Change, item: Item, reason: str, now: int, *, crashed: bool = True,
                    suspect: bool = False) -> Change:
    """An item whose processing stopped (the stage raised, or the worker's lease ran out):
    an operator's request applies now; else it goes back to its queue, or into Poison. Only
    a ``crashed`` worker counts towards the poison threshold (not a stall or a partition
    that merely let the lease run out)."""
    settings = hub.settings
    crashes = item.crashes + int(crashed)
    if item.pending == PendingAction.REMOVE:
        msg = hub.queues.messages([item.msg]).get(item.msg)
        return remove_item(hub, change, item, msg, ndr=item.remove_ndr, now=now, claimed=True)
    if item.pending == PendingAction.SUSPEND:
        change.note(item, ItemStatus.SUSPENDED.value)
        return change.park(item, item.recipients, until=None, last_error=reason)
    if settings.poison_message_detection_enabled and crashes >= settings.poison_threshold:
        change.to_poison(item, crashes=crashes, reason=reason, now=now)
        change.track(Record(Event.POISONMESSAGE, source="ROUTING", server=hub.name, internal_id=item.msg,
                            queue=poison_queue(item.site).identity, recipients=[r.address for r in item.recipients],
                            context=reason[:200]), now)
        log.error("item %s moved to Poison after %d crashes: %s", item.id, crashes, reason)
        return change
    return change.put_back(item, status=ItemStatus.READY.value, crashes=crashes, suspect=suspect,
                           last_error=f"processing failed: {reason}" if crashed else reason)


def remove_item(hub: Hub, change: Change, item: Item, msg: Message | None, *, ndr: bool, now: int,
                claimed: bool = False, site: str | None = None) -> Change:
    """Remove-Message: the item leaves for good, its recipients get an NDR when ``ndr``."""
    change.complete(item, claimed=claimed)
    change.note(item, "Removed" + ("" if ndr else " without NDR"))
    if msg is None:
        return change
    failures = [dsn.Failure(r.address, dsn.REMOVED, r.original) for r in item.recipients]
    change.track(_record(hub, msg, Event.FAIL, item, [f.recipient for f in failures],
                         [f.diagnostic for f in failures], source="ADMIN",
                         context="removed by an administrator" + ("" if ndr else " without NDR")), now)
    if ndr and msg.wants_report:
        body = hub.queues.bodies([msg.id]).get(msg.id, b"")
        queue_report(hub, change, msg, body, failures, item_id=hub.queues.new_item_ids(1)[0], now=now,
                     site=site or item.site)
    return change
