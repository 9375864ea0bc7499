"""The categorizer: resolve, expand, check limits, route and bifurcate.

For each message taken from the Submission queue: every envelope recipient is resolved
against the directory (aliases to primary addresses, groups expanded recursively, each
final recipient once), the organization's limits are applied, each recipient is routed to
its next hop, and the message is split into one item per next hop. Recipients that cannot
be resolved (unknown in an accepted domain) or that break a limit get an NDR; the rest of
the message goes on. All of it is one atomic step per message.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

from mailyard import faults
from mailyard.directory import Expansion
from mailyard.hub import dsn
from mailyard.hub.bounce import queue_report
from mailyard.hub.node import Hub
from mailyard.hub.outcomes import REBUILDS, Batch, remove_item
from mailyard.hub.queues import Change, QueueSpec
from mailyard.hub.records import DeliveryType, Item, PendingAction, Recipient
from mailyard.hub.routing import next_hop_queue
from mailyard.registry import now_ms
from mailyard.tracking import Event, Record

UNREACHABLE_ERROR = "554 5.4.4 ROUTING.NoConnectorForAddressSpace; no send connector matches"


def categorize(hub: Hub, batch: Batch, *, rebuilds: int = REBUILDS) -> None:
    directory = hub.directory()
    org = directory.org
    settings = org.transport
    now = now_ms()
    queues = hub.queues
    plans = []
    early: list[tuple[Item, Change]] = []  # items that are not categorized: changes of their own
    for item in batch.items:
        msg = batch.messages.get(item.msg)
        change = queues.change().require_lease(item, batch.token).require_pending(item, item.pending)
        if msg is None:  # the message vanished (removed meanwhile): drop the husk
            early.append((item, change.complete(item, claimed=True)))
            continue
        if item.pending == PendingAction.REMOVE:  # an operator removed it while it was being categorized
            early.append((item, remove_item(hub, change, item, msg, ndr=item.remove_ndr, now=now, claimed=True)))
            continue
        faults.pill("categorize.pill", msg.subject)
        envelope = [r.address for r in item.recipients]
        expansion = directory.expand(envelope)
        failures: list[dsn.Failure] = [dsn.Failure(a, dsn.RECIP_NOT_FOUND, a) for a in expansion.unknown]
        finals = expansion.finals
        if msg.size > settings.max_message_size:
            failures += [dsn.Failure(f.address, dsn.SIZE_LIMIT, f.original) for f in finals]
            finals = []
        elif len(envelope) > settings.max_recipient_envelope_limit and not msg.dsn:
            failures += [dsn.Failure(f.address, dsn.RECIP_LIMIT, f.original) for f in finals]
            finals = []
        groups: dict[str, tuple[QueueSpec, list[Recipient]]] = {}
        for final in finals:
            spec = next_hop_queue(org, hub.site, final, msg.size)
            rcpt = Recipient(final.address, original=final.original, kind=final.kind.value)
            if spec.delivery_type is DeliveryType.UNREACHABLE:
                rcpt.last_error = UNREACHABLE_ERROR
            groups.setdefault(spec.identity, (spec, []))[1].append(rcpt)
        plans.append((item, msg, expansion, failures, list(groups.values())))

    bodies = queues.bodies([msg.id for _, msg, _, failures, _ in plans if failures and msg.wants_report])
    ids = iter(queues.new_item_ids(sum(len(g) for *_, g in plans) + len(bodies)))
    changes = []
    for item, msg, expansion, failures, routed in plans:
        change = queues.change().require_lease(item, batch.token).require_pending(item, item.pending)
        base = Record(Event.RESOLVE, source="ROUTING", server=hub.name, internal_id=msg.id,
                      message_id=msg.message_id, sender=msg.sender, subject=msg.subject,
                      size=msg.size)
        _track_expansion(change, base, expansion, now)
        for spec, recipients in routed:
            change.hold_message(msg.id)
            change.enqueue(spec, next(ids), msg, recipients, now=now)
            if len(routed) > 1:
                change.track(_rec(base, Event.TRANSFER, [r.address for r in recipients],
                                  reference=f"item {item.id}", queue=spec.identity), now)
        if failures:
            change.track(_rec(base, Event.FAIL, [f.recipient for f in failures],
                              status=[f.diagnostic for f in failures]), now)
            if msg.id in bodies:
                queue_report(hub, change, msg, bodies[msg.id], failures, item_id=next(ids), now=now)
        change.complete(item, claimed=True)
        changes.append(change)
    hub.crash_point("categorize.before_commit")
    items = [item for item, _ in early] + [plan[0] for plan in plans]
    results = queues.commit([change for _, change in early] + changes)
    # An operator's request arrived after the item was read: read it again and start over.
    again = [item.id for item, res in zip(items, results, strict=True) if res.failed == "pending"]
    fresh = [i for i in queues.items(again) if i.lease == batch.token] if again else []
    if fresh and rebuilds > 0:
        categorize(hub, replace(batch, items=fresh), rebuilds=rebuilds - 1)


def _rec(base: Record, event: Event, recipients: list[str], *, status: list[str] | None = None,
         related: str = "", reference: str = "", queue: str = "") -> Record:
    rec = Record(**{**base.__dict__})
    rec.event, rec.recipients, rec.recipient_status = event, recipients, status or []
    rec.related, rec.reference, rec.queue = related, reference, queue
    return rec


def _track_expansion(change: Change, base: Record, expansion: Expansion, now: int) -> None:
    by_group: dict[str, list[str]] = defaultdict(list)
    for group, members in expansion.expanded:
        by_group[group] = members
    for alias, primary in expansion.resolved:
        change.track(_rec(base, Event.RESOLVE, [primary], related=alias), now)
    for group, members in by_group.items():
        change.track(_rec(base, Event.EXPAND, members, related=group), now)

