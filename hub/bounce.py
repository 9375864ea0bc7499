"""Queue NDRs and delay DSNs for a message's sender, as part of the caller's change.

The report enters the Submission queue of the hub's site as a new message from ``<>``, so
it is categorized and delivered like any other mail (to a mailbox, another site or the
Internet). A message from ``<>`` (itself a report) never gets one.
"""

from __future__ import annotations

import time

from mailyard.hub import dsn
from mailyard.hub.node import Hub
from mailyard.hub.queues import Change, submission_queue
from mailyard.hub.records import Message, Recipient, new_message_id
from mailyard.tracking import Event, Record


def queue_report(
    hub: Hub,
    change: Change,
    msg: Message,
    original: bytes,
    failures: list[dsn.Failure],
    *,
    item_id: str,
    delayed: bool = False,
    now: int,
    site: str | None = None,
) -> str | None:
    """Add the report to ``change``; returns its message id (None when no report is due).

    ``item_id`` must be freshly allocated (``MailQueues.new_item_ids``) for the report's
    queue item. The report enters the Submission queue of ``site`` (default: the hub's own).
    """
    site = site or hub.site
    if not failures or not msg.wants_report:
        return None
    org = hub.directory().org
    raw, message_id = dsn.build(
        delayed=delayed,
        reporting_mta=hub.fqdn,
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
        hub=hub.name,
        dsn="delay" if delayed else "ndr",
        smtputf8=not msg.sender.isascii(),  # dsn.build: to such a sender, an SMTPUTF8 message
    )
    change.add_message(report, raw, refs=1)
    change.enqueue(submission_queue(site), item_id, report, [Recipient(msg.sender)], now=now)
    change.track(Record(
        Event.DSN,
        source="DSN",
        server=hub.name,
        internal_id=report.id,
        message_id=message_id,
        recipients=[msg.sender],
        recipient_status=[f.diagnostic for f in failures],
        reference=msg.message_id,
        sender="",
        subject=report.subject,
        size=len(raw),
        related=";".join(f.recipient for f in failures),
    ), now)
    return report.id
