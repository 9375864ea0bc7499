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

from mailyard import faults, keys, tracking
from mailyard.directory import Expansion
from mailyard.hub import dsn
from mailyard.hub.bounce import queue_report, wants_report
from mailyard.hub.delivery import Batch, register
from mailyard.hub.node import Node
from mailyard.hub.queues import (
    DeliveryType,
    QueueSpec,
    Recipient,
    allocate_items,
    enqueue,
    forget_item,
    load_bodies,
)
from mailyard.hub.routing import route
from mailyard.nodes import now_ms
from mailyard.tracking import Event, Record
from mailyard.txn import Txn

UNREACHABLE_ERROR = "554 5.4.4 ROUTING.NoConnectorForAddressSpace; no send connector matches"


def categorize(node: Node, batch: Batch) -> None:
    directory = node.orgs.get()
    org = directory.org
    settings = org.transport
    now = now_ms()
    plans = []
    for item in batch.items:
        msg = batch.messages.get(item.msg)
        if msg is None:
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
            spec = route(org, node.site, final, msg.size)
            rcpt = Recipient(final.address, original=final.original, kind=final.kind.value)
            if spec.delivery_type is DeliveryType.UNREACHABLE:
                rcpt.last_error = UNREACHABLE_ERROR
            groups.setdefault(spec.identity, (spec, []))[1].append(rcpt)
        plans.append((item, msg, expansion, failures, list(groups.values())))

    reporting = [msg.id for _, msg, _, failures, _ in plans if failures and wants_report(msg)]
    bodies = load_bodies(node.r, reporting)
    ids = iter(allocate_items(node.r, sum(len(g) for *_, g in plans) + len(reporting)))
    txns = []
    retention = settings.message_tracking_log_max_age
    for item, msg, expansion, failures, routed in plans:
        txn = Txn().guard_eq(keys.item(item.id), "lease", batch.token)
        base = Record(Event.RESOLVE, source="ROUTING", server=node.name, internal_id=msg.id,
                      message_id=msg.message_id, sender=msg.sender, subject=msg.subject,
                      size=msg.size)
        _track_expansion(txn, base, expansion, retention, now)
        for spec, recipients in routed:
            txn.op("HINCRBY", keys.msg(msg.id), "refs", 1)
            new_id = next(ids)
            enqueue(txn, spec, new_id, msg, recipients, now=now)
            if len(routed) > 1:
                tracking.add(txn, _rec(base, Event.TRANSFER, [r.address for r in recipients],
                                       reference=f"item {item.id}", queue=spec.identity), retention, now)
        if failures:
            tracking.add(txn, _rec(base, Event.FAIL, [f.recipient for f in failures],
                                   status=[f.diagnostic for f in failures]), retention, now)
            if msg.id in bodies:
                queue_report(node, txn, msg, bodies[msg.id], failures, item_id=next(ids), now=now)
        forget_item(txn, item, claimed=True)
        txns.append(txn)
    faults.point("categorize.before_commit", node.r)
    node.commit_all(txns)


def _rec(base: Record, event: Event, recipients: list[str], *, status: list[str] | None = None,
         related: str = "", reference: str = "", queue: str = "") -> Record:
    rec = Record(**{**base.__dict__})
    rec.event, rec.recipients, rec.recipient_status = event, recipients, status or []
    rec.related, rec.reference, rec.queue = related, reference, queue
    return rec


def _track_expansion(txn: Txn, base: Record, expansion: Expansion, retention: float, now: int) -> None:
    by_group: dict[str, list[str]] = defaultdict(list)
    for group, members in expansion.expanded:
        by_group[group] = members
    for alias, primary in expansion.resolved:
        tracking.add(txn, _rec(base, Event.RESOLVE, [primary], related=alias), retention, now)
    for group, members in by_group.items():
        tracking.add(txn, _rec(base, Event.EXPAND, members, related=group), retention, now)


def _cap(node: Node) -> int:
    return 0  # any number of hubs may categorize at once


register(DeliveryType.UNDEFINED.value, categorize, _cap)
