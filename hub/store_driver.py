"""The store driver: pickup from mailbox servers' Outboxes, delivery to their Inboxes.

Pickup (a hub was notified by the Mail Submission Service):
  1. fetch the Outbox item over the mailbox server's API;
  2. write the message into the Submission queue in one atomic step, recorded against the
     Outbox item so a second pickup of the same item (a re-notification after a crash)
     creates nothing;
  3. only then acknowledge it, which moves the original to Sent Items.
Delivery (MapiDelivery, one queue per mailbox server): one API call per batch; the mailbox
server stores each message once per mailbox, however often it is retried.
"""

from __future__ import annotations

import logging
from email.utils import formatdate

from mailyard import headers, keys, mime
from mailyard.errors import DeliveryError, TransientDeliveryError
from mailyard.hub.intake import accept
from mailyard.hub.node import Node
from mailyard.hub.outcomes import Batch, Outcome, defer_batch, settle
from mailyard.hub.records import Message, new_message_id
from mailyard.org import normalize_address
from mailyard.registry import now_ms
from mailyard.tracking import Event, Record

log = logging.getLogger("mailyard.hub.store_driver")


def pickup(node: Node, server: str, mailbox: str, item: str) -> str | None:
    """Take one Outbox item into the Submission queue; returns its message id."""
    ref = keys.outbox_ref(server, mailbox, item)
    msg_id = node.queues.known(ref)
    if msg_id is None:
        try:
            raw = node.mailboxes.fetch_outbox(server, mailbox, item)
        except DeliveryError as exc:
            log.warning("pickup of %s failed: %s (the submission service will re-notify)", ref, exc)
            return None
        if raw is None:
            # Gone from the Outbox: another hub took it and it is in Sent Items already.
            node.r.zrem(keys.submit_pending(server), ref)
            return None
        msg_id = _submit(node, server, mailbox, ref, raw)
        node.crash_point("pickup.stored")
    try:
        node.mailboxes.ack_outbox(server, mailbox, item)
    except DeliveryError as exc:
        log.warning("could not acknowledge %s: %s (a re-notification will finish it)", ref, exc)
    return msg_id


def _submit(node: Node, server: str, mailbox: str, ref: str, raw: bytes) -> str:
    settings = node.settings
    size = len(raw)  # as submitted: the limits apply to that (Exchange's OriginalSize)
    taken = mime.intake(raw)  # once, on the way in: CRLF, and no line too long for SMTP
    if isinstance(taken, mime.LongHeaderLine):  # the mailbox API refuses these; pass it on as it is
        log.warning("%s: %s", ref, taken)
    else:
        raw = taken
    head = headers.parse(raw)
    recipients: list[str] = []
    for field in ("To", "Cc", "Bcc"):
        try:
            found = headers.addresses(head, field)
        except ValueError:
            continue  # the mailbox server checked them
        for _, addr in found:
            try:
                address = normalize_address(addr)
            except ValueError:
                continue  # the mailbox server checked them; a bad one here is dropped
            if address not in recipients:
                recipients.append(address)
    now = now_ms()
    msg = Message(
        id=new_message_id(),
        sender=mailbox,
        message_id=str(head.get("Message-ID", "")).strip(),
        subject=headers.text(head, "Subject")[:500],
        received=now,
        expires=now + int(settings.message_expiration_timeout * 1000),
        source="STOREDRIVER",
        origin=ref,
        site=node.site,
        hub=node.name,
        client=server,
        smtputf8=mime.utf8_message(mailbox, recipients, raw),
    )
    body = headers.prepend(
        headers.strip(raw, "Bcc"),
        f"Received: from {server} by {node.fqdn} (Mailyard hub) with MAPI id {msg.id};"
        f" {formatdate(localtime=False)}",
    )
    msg.size = size
    queues = node.queues
    change = accept(
        queues.change(), msg, body, recipients, item_id=queues.new_item_ids(1)[0], settings=settings, now=now,
        dedup=ref,
        record=Record(Event.RECEIVE, source="STOREDRIVER", server=node.name, client=server,
                      message_id=msg.message_id, recipients=recipients, sender=mailbox,
                      subject=msg.subject, size=msg.size,
                      context=f"Mailbox:{mailbox}, Item:{ref.rsplit('/', 1)[-1]}"),
    )
    result = queues.commit([change])[0]
    if result.failed == "first":  # picked up meanwhile by another hub
        return result.value or ""
    return msg.id


def deliver(node: Node, batch: Batch) -> None:
    """MapiDelivery: hand the batch to its mailbox server in one API call."""
    bodies = node.queues.bodies([i.msg for i in batch.items])
    work = [
        (item.msg, [r.address for r in item.recipients], bodies[item.msg])
        for item in batch.items
        if item.msg in bodies
    ]
    if not work:
        settle(node, batch, {})
        return
    node.crash_point("deliver.before_api")
    try:
        results = node.mailboxes.deliver(batch.next_hop, work)
    except TransientDeliveryError as exc:
        defer_batch(node, batch, exc)
        return
    node.crash_point("deliver.after_api")
    by_msg: dict[tuple[str, str], Outcome] = {
        (res.msg, res.recipient): Outcome(res.code, res.status, res.text) for res in results
    }
    outcomes = {
        item.id: {
            r.address: by_msg[(item.msg, r.address)]
            for r in item.recipients
            if (item.msg, r.address) in by_msg
        }
        for item in batch.items
    }
    settle(node, batch, outcomes, event=Event.DELIVER, source="STOREDRIVER", remote=batch.next_hop)
