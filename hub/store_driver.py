"""The store driver: pickup from mailbox servers' Outboxes, delivery to their Inboxes.

Pickup (the Mail Submission Service kicked this hub: the server's Outboxes hold mail):
  1. take up to ``batch_size`` waiting items of the server in one API call (the server holds
     them for this hub meanwhile, so that a hub kicked next takes others);
  2. write them into the Submission queue in one Redis round trip, each message in one atomic
     step recorded against its Outbox item, so that a second pickup of an item (after a crash,
     or a lease that ran out) creates nothing;
  3. only then acknowledge them in one call, which moves them to Sent Items (with transport
     ``durability`` ``replica``: only once a replica has them, mailyard.durability);
and again while batches come back full.
Delivery (MapiDelivery, one queue per mailbox server): one API call per batch; the mailbox
server stores each message once per mailbox, however often it is retried.
"""

from __future__ import annotations

import logging
import time
from email.utils import formatdate

from mailyard import durability, headers, keys, mime
from mailyard.errors import DeliveryError, TransientDeliveryError
from mailyard.hub import content_filter, sender_auth
from mailyard.hub.intake import accept
from mailyard.hub.mailbox_client import OutboxItem
from mailyard.hub.node import Node
from mailyard.hub.outcomes import Batch, Outcome, defer_batch, settle
from mailyard.hub.queues import Change
from mailyard.hub.records import Message, new_message_id
from mailyard.hub.relay import ORG_HEADERS
from mailyard.org import normalize_address
from mailyard.registry import now_ms
from mailyard.submission.service import Notifier
from mailyard.tracking import Event, Record

log = logging.getLogger("mailyard.hub.store_driver")

PICKUP_TIME = 10.0  # seconds one pickup task spends before it hands what is left to the next hub


def pickup(node: Node, server: str) -> int:
    """Take the waiting Outbox items of ``server`` into the Submission queue; how many."""
    node.r.delete(keys.submit_kick(server))  # mail that comes from now on kicks again
    limit = node.settings.batch_size
    deadline = time.monotonic() + PICKUP_TIME
    taken = 0
    while True:
        try:
            items = node.mailboxes.take_outbox(server, limit)
        except DeliveryError as exc:
            log.warning("pickup from %s failed: %s (the submission service will kick again)", server, exc)
            return taken
        if not items:
            return taken
        node.crash_point("pickup.taken")
        try:
            ids = node.queues.new_item_ids(len(items))
            node.queues.commit([_change(node, server, item, item_id) for item, item_id in zip(items, ids, strict=True)],
                               replicated=durability.replicated(node.settings.durability, node.r))
        except Exception as exc:
            if (refused := durability.unreplicated(exc)) is None:
                raise
            # Not acknowledged: the items stay in the Outbox and are notified again; the next
            # pickup finds what reached the primary by its Outbox ref and stores nothing twice.
            log.warning("%d item(s) of %s not acknowledged: %s", len(items), server, refused.reason)
            return taken
        node.crash_point("pickup.stored")
        try:
            node.mailboxes.ack_outbox(server, [(item.mailbox, item.id) for item in items])
        except DeliveryError as exc:
            log.warning("could not acknowledge %d item(s) of %s: %s (the next pickup finishes them)",
                        len(items), server, exc)
            return taken
        taken += len(items)
        if len(items) < limit:
            return taken
        if time.monotonic() > deadline:  # a backlog: share it with the site's other hubs
            Notifier(node.r, node.app, node.orgs).kick(server, avoid=node.name, again=True)
            return taken


def _change(node: Node, server: str, item: OutboxItem, item_id: str) -> Change:
    """The change that puts one Outbox item into the Submission queue (nothing, if it is there)."""
    settings = node.settings
    mailbox, raw = item.mailbox, item.raw
    ref = keys.outbox_ref(server, mailbox, item.id)
    size = len(raw)  # as submitted: the limits apply to that (Exchange's OriginalSize)
    taken = mime.intake(raw)  # once, on the way in: CRLF, and no line too long for SMTP
    if isinstance(taken, mime.Unfit):  # (the mailbox API refuses long header lines) pass it on as it is
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
    # What only a subscribed Edge may say of a message (its SCL, its authentication results),
    # and the organization's own headers: never from a mailbox's own Send, or a user could
    # junk a colleague's mail or vouch for it.
    clean = headers.strip(raw, "Bcc", content_filter.SCL_HEADER, *ORG_HEADERS)
    if edges := {e.fqdn for e in node.orgs.org.edge_subscriptions}:
        clean = sender_auth.strip_results(clean, edges)
    body = headers.prepend(
        clean,
        f"Received: from {server} by {node.fqdn} (Mailyard hub) with MAPI id {msg.id};"
        f" {formatdate(localtime=False)}",
    )
    msg.size = size
    return accept(
        node.queues.change(), msg, body, recipients, item_id=item_id, settings=settings, now=now, dedup=ref,
        record=Record(Event.RECEIVE, source="STOREDRIVER", server=node.name, client=server,
                      message_id=msg.message_id, recipients=recipients, sender=mailbox,
                      subject=msg.subject, size=msg.size,
                      context=f"Mailbox:{mailbox}, Item:{item.id}"),
    )


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
