"""Queue NDRs and delay DSNs for a message's sender, as part of the caller's transaction.

The report enters the Submission queue of the hub's site as a new message from ``<>``, so
it is categorized and delivered like any other mail (to a mailbox, another site or the
Internet). A message from ``<>`` (itself a report) never gets one.
"""

from __future__ import annotations

import time

from mailyard import tracking
from mailyard.hub import dsn
from mailyard.hub.node import Node
from mailyard.hub.queues import Message, Recipient, create_message, enqueue, new_message_id, submission_queue
from mailyard.tracking import Event, Record
from mailyard.txn import Txn


def wants_report(msg: Message) -> bool:
    return bool(msg.sender) and not msg.dsn


def queue_report(
    node: Node,
    txn: Txn,
    msg: Message,
    original: bytes,
    failures: list[dsn.Failure],
    *,
    item_id: str,
    delayed: bool = False,
    now: int,
    site: str | None = None,
) -> str | None:
    """Add the report to ``txn``; returns its message id (None when no report is due).

    ``item_id`` must be freshly allocated (``allocate_items``) for the report's queue item.
    The report enters the Submission queue of ``site`` (default: the hub's own).
    """
    site = site or node.site
    if not failures or not wants_report(msg):
        return None
    org = node.orgs.org
    raw, message_id = dsn.build(
        delayed=delayed,
        reporting_mta=node.fqdn,
        postmaster=org.postmaster_address,
        recipient=msg.sender,
        original=original,
        original_subject=msg.subject,
        original_message_id=msg.message_id,
        arrival=time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(msg.received / 1000)),
        failures=failures,
    )
    report = Message(
        id=new_message_id(),
        sender="",
        message_id=message_id,
        subject=("Delivery delayed: " if delayed else "Undeliverable: ") + msg.subject,
        size=len(raw),
        received=now,
        expires=now + int(org.transport.message_expiration_timeout * 1000),
        source="DSN",
        origin=msg.id,
        site=site,
        hub=node.name,
        dsn="delay" if delayed else "ndr",
    )
    create_message(txn, report, raw, refs=1)
    enqueue(txn, submission_queue(site), item_id, report, [Recipient(msg.sender)], now=now)
    tracking.add(
        txn,
        Record(
            Event.DSN,
            source="DSN",
            server=node.name,
            internal_id=report.id,
            message_id=message_id,
            recipients=[msg.sender],
            recipient_status=[f.diagnostic for f in failures],
            reference=msg.message_id,
            sender="",
            subject=report.subject,
            size=len(raw),
            related=";".join(f.recipient for f in failures),
        ),
        org.transport.message_tracking_log_max_age,
        now,
    )
    return report.id
