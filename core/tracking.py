"""The message tracking log: Exchange's events, kept in a Redis stream, searchable site-wide.

Events are written inside the same atomic step as the state change they describe (a
``Txn`` operation), so the log never claims something that did not happen. Retention is
``transport.message_tracking_log_max_age``; old entries are trimmed as new ones arrive.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

import redis

from mailyard import keys
from mailyard.redisconn import text, text_map
from mailyard.txn import Txn


class Event(StrEnum):
    RECEIVE = "RECEIVE"
    SUBMIT = "SUBMIT"
    RESOLVE = "RESOLVE"
    EXPAND = "EXPAND"
    TRANSFER = "TRANSFER"
    DEFER = "DEFER"
    DELIVER = "DELIVER"
    SEND = "SEND"
    FAIL = "FAIL"
    DSN = "DSN"
    POISONMESSAGE = "POISONMESSAGE"
    REDIRECT = "REDIRECT"
    LOCKOUT = "LOCKOUT"  # Mailyard's: a source or a mailbox locked out of SMTP logons (no message)


# Exchange's field names (Get-MessageTrackingLog output), in log order.
FIELDS = (
    "event",
    "source",
    "server",
    "client",
    "connector",
    "internal_id",
    "message_id",
    "recipients",
    "recipient_status",
    "related",
    "reference",
    "sender",
    "subject",
    "size",
    "context",
    "queue",
)


@dataclass
class Record:
    event: str
    source: str = ""
    server: str = ""
    client: str = ""
    connector: str = ""
    internal_id: str = ""
    message_id: str = ""
    recipients: list[str] = field(default_factory=list)
    recipient_status: list[str] = field(default_factory=list)
    related: str = ""
    reference: str = ""
    sender: str = ""
    subject: str = ""
    size: int = 0
    context: str = ""
    queue: str = ""
    time_ms: int = 0

    def words(self) -> list[str | int]:
        out: list[str | int] = []
        for name in FIELDS:
            value = getattr(self, name)
            if isinstance(value, list):
                # JSON, because SMTP replies contain the ";" Exchange's CSV log separates with.
                value = json.dumps(value) if value else ""
            if value not in ("", 0):
                out += [name, value]
        return out

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"time": _iso(self.time_ms)}
        for name in FIELDS:
            d[name] = getattr(self, name)
        return d


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def add(txn: Txn, record: Record, retention_s: float, now_ms: int | None = None) -> None:
    """Append ``record`` to the log as part of ``txn``, trimming entries past retention."""
    now_ms = now_ms or int(time.time() * 1000)
    min_id = max(0, now_ms - int(retention_s * 1000))
    txn.op("XADD", keys.TRACK, "MINID", "~", min_id, "*", *record.words())
    # The counters behind /metrics: recipients per event and queue (messages for RECEIVE).
    label = record.queue or record.connector or record.source or "-"
    count = 1 if record.event in (Event.RECEIVE, Event.SUBMIT, Event.DSN) else max(1, len(record.recipients))
    txn.op("HINCRBY", keys.STATS, f"{record.event}|{label}", count)
    if (flow := flow_field(record)) is not None:  # the same counts per minute (mailyard.hub.flow)
        raw = keys.flow_raw(now_ms // 60_000)
        txn.op("HINCRBY", raw, flow, count)
        txn.op("EXPIRE", raw, FLOW_RAW_TTL_S)


FLOW_RAW_TTL_S = 3 * 3600  # (the sweeper rolls a minute up within two; this is if none runs)
FLOW_EVENTS = (Event.DELIVER, Event.SEND, Event.DEFER, Event.FAIL)


def flow_field(record: Record) -> str | None:
    """The field a record counts in, in its minute's ``my:flow:raw``: recipients by next hop
    queue (``<site>\\<next hop>``), or by the hub where there is no queue (a recipient the
    categorizer failed); messages received by the hub. None: not part of the flow (an agent's
    refusal at SMTP was never accepted; a submission is counted as its store driver receives it)."""
    if record.event == Event.RECEIVE:
        return f"RECEIVE|@{record.server}"
    if record.event in FLOW_EVENTS and record.source != "AGENT":
        return f"{record.event}|{record.queue}" if record.queue else f"{record.event}|@{record.server}"
    return None


def _record(entry_id: str, data: dict[str, str]) -> Record:
    values = dict(data)
    rec = Record(event=values.pop("event", ""))
    for name, value in values.items():
        if name in ("recipients", "recipient_status"):
            setattr(rec, name, json.loads(value) if value else [])
        elif name == "size":
            rec.size = int(value)
        elif name in FIELDS:
            setattr(rec, name, value)
    rec.time_ms = int(entry_id.split("-")[0])
    return rec


def parse_time(value: str) -> int:
    """Milliseconds since 1970 of an ISO 8601 time (UTC unless it says otherwise), as
    ``mailyard track --start/--end`` and the Queue Viewer take it. ValueError says why not."""
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a time; use ISO 8601, e.g. 2026-11-26T10:00:00") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    ms = int(dt.timestamp() * 1000)
    if ms < 0:  # the log's stream ids are milliseconds since 1970: Redis refuses a negative one
        raise ValueError(f"{value!r} is before 1970-01-01T00:00:00Z; the tracking log holds nothing older")
    return ms


def search(
    r: redis.Redis,
    *,
    message_id: str | None = None,
    internal_id: str | None = None,
    sender: str | None = None,
    recipient: str | None = None,
    event: str | None = None,
    start_ms: int | None = None,
    end_ms: int | None = None,
    limit: int = 1000,
) -> list[Record]:
    """Matching records, oldest first (Get-MessageTrackingLog; ``end`` is exclusive)."""
    out: list[Record] = []
    for rec in _scan(r, start_ms, end_ms):
        if message_id and rec.message_id.strip("<>") != message_id.strip("<>"):
            continue
        if internal_id and rec.internal_id != internal_id:
            continue
        if sender and rec.sender.lower() != sender.lower():
            continue
        if recipient and recipient.lower() not in (a.lower() for a in rec.recipients) and (
            rec.related.lower() != recipient.lower()
        ):
            continue
        if event and rec.event != event.upper():
            continue
        out.append(rec)
        if len(out) >= limit:
            break
    return out


def _scan(r: redis.Redis, start_ms: int | None, end_ms: int | None) -> Iterator[Record]:
    if end_ms is not None and end_ms <= 0:
        return  # (nothing is before 1970, and Redis refuses the exclusive end "(0-0")
    lo = f"{start_ms}-0" if start_ms is not None else "-"
    hi = f"({end_ms}-0" if end_ms is not None else "+"
    while True:
        batch = r.xrange(keys.TRACK, lo, hi, count=1000)
        if not batch:
            return
        for entry_id, data in batch:
            yield _record(text(entry_id), text_map(data))
        lo = "(" + text(batch[-1][0])
