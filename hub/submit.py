"""A new message enters the Submission queue: one atomic step shared by every way in (the
store driver's pickup, receive connectors, reports)."""

from __future__ import annotations

from mailyard import keys, tracking
from mailyard.hub.queues import Message, Recipient, create_message, enqueue, submission_queue
from mailyard.org import TransportSettings
from mailyard.tracking import Event, Record
from mailyard.txn import Txn

MEMORY_S = 7 * 86400  # how long a dedup key is remembered (longer than any message lives)


def submission_txn(
    msg: Message,
    body: bytes,
    recipients: list[str],
    *,
    item_id: str,
    settings: TransportSettings,
    now: int,
    dedup_key: str | None = None,
    record: Record,
) -> Txn:
    """The transaction that stores ``msg`` with one Submission-queue item for ``recipients``.

    With ``dedup_key``, the transaction does nothing if that key exists (the message was
    taken in already: a repeated pickup, or a relay repeated after a lost reply); its
    failed guard (number 2) then carries the id of the message created the first time.
    A failed guard 1 means this very transaction had already been applied.
    """
    # Guard 1: the message is new. Redis clients re-send a command whose connection broke,
    # and a transaction that had run already must not create the message a second time.
    txn = Txn().guard_absent(keys.msg(msg.id))
    if dedup_key:
        txn.guard_absent(dedup_key)  # guard 2
    delay_at = now + int(settings.delay_notification_timeout * 1000) if settings.delay_dsn_enabled else 0
    create_message(txn, msg, body, refs=1, delay_dsn_at=delay_at)
    enqueue(txn, submission_queue(msg.site), item_id, msg, [Recipient(a) for a in recipients], now=now)
    if dedup_key:
        txn.op("SET", dedup_key, msg.id, "EX", MEMORY_S)
    record.event = Event.RECEIVE
    record.internal_id = msg.id
    tracking.add(txn, record, settings.message_tracking_log_max_age, now)
    return txn

