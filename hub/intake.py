"""A new message enters the pipeline: stored, with one item in the Submission queue, in one
atomic step shared by every way in (the store driver's pickup, receive connectors)."""

from __future__ import annotations

from typing import TypeVar

from mailyard.hub.queues import Change, submission_queue
from mailyard.hub.records import Message, Recipient
from mailyard.org import TransportSettings
from mailyard.tracking import Event, Record

MEMORY_S = 7 * 86400  # how long a dedup key is remembered (longer than any message lives)


C = TypeVar("C", bound=Change)


def accept(
    change: C,
    msg: Message,
    body: bytes,
    recipients: list[str],
    *,
    item_id: str,
    settings: TransportSettings,
    now: int,
    dedup: str | None = None,
    record: Record,
) -> C:
    """Add to ``change``: store ``msg`` with one Submission-queue item for ``recipients``.

    With ``dedup``, the change does nothing if that key was remembered (the message was
    taken in already: a repeated pickup, or a relay repeated after a lost reply); its
    failed guard is then "first" and carries the id of the message created the first time.
    A failed "new" guard means this very change had already been applied (Redis clients
    re-send a command whose connection broke).
    """
    change.require_new_message(msg.id)
    if dedup:
        change.require_first(dedup)
    delay_at = now + int(settings.delay_notification_timeout * 1000) if settings.delay_dsn_enabled else 0
    change.add_message(msg, body, refs=1, delay_report_at=delay_at)
    change.enqueue(submission_queue(msg.site), item_id, msg, [Recipient(a) for a in recipients], now=now)
    if dedup:
        change.remember(dedup, msg.id, MEMORY_S)
    record.event = Event.RECEIVE
    record.internal_id = msg.id
    change.track(record, now)
    return change
