"""What the Queue Viewer shows, for the CLI and the JSON API alike: Get-Queue and
Get-Message rows across every hub, with Exchange-style filters and sorting.

Rows are JSON-ready dicts with snake_case keys; filters (mailyard.filters) see the same
rows under Exchange's property names (``MessageCount``, ``NextHopDomain``, ``FromAddress``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import redis

from mailyard import keys, registry
from mailyard.errors import MailyardError, NotFoundError
from mailyard.filters import Field, Filter, parse
from mailyard.hub.queues import QueueKind, QueueStatus
from mailyard.hub.records import DeliveryType, Item, ItemStatus, Message, PendingAction
from mailyard.hub.redis_queues import RedisQueues
from mailyard.redisconn import texts

QUEUE_PROPERTIES = {
    "Identity": "identity", "DeliveryType": "delivery_type", "Status": "status",
    "MessageCount": "message_count", "NextHopDomain": "next_hop_domain", "LastError": "last_error",
    "LastRetryTime": "last_retry_time", "NextRetryTime": "next_retry_time", "Site": "site",
    "NextHopConnector": "connector",
}
MESSAGE_PROPERTIES = {
    "Identity": "identity", "Queue": "queue", "FromAddress": "from_address", "Status": "status",
    "Size": "size", "Subject": "subject", "DateReceived": "date_received", "ExpirationTime": "expiration_time",
    "RetryCount": "retry_count", "LastError": "last_error", "InternetMessageId": "message_id",
    "SourceIP": "source_ip", "Site": "site",
}
MAX_MESSAGES = 250_000  # Exchange's cap on a Get-Message result

# What a filter may name, and the values of its enums: the hub's own (a message's Status is
# its item's, or the operator's request while it is being delivered), listed alphabetically.
QUEUE_STATUSES = tuple(sorted(s.value for s in QueueStatus))
DELIVERY_TYPES = tuple(d.value for d in DeliveryType)
MESSAGE_STATUSES = (*sorted(s.value for s in ItemStatus), *(p.value for p in PendingAction if p.value))


def _fields(*fields: Field) -> dict[str, Field]:
    return {field.name: field for field in fields}


QUEUE_FIELDS: dict[str, Field] = _fields(
    Field("Identity", "str"),
    Field("DeliveryType", "enum", DELIVERY_TYPES),
    Field("Status", "enum", QUEUE_STATUSES),
    Field("MessageCount", "int"),
    Field("NextHopDomain", "str"),
    Field("LastError", "str"),
    Field("LastRetryTime", "datetime"),
    Field("NextRetryTime", "datetime"),
    Field("Site", "str"),
    Field("NextHopConnector", "str"),
)

MESSAGE_FIELDS: dict[str, Field] = _fields(
    Field("Identity", "str"),
    Field("Queue", "str"),
    Field("FromAddress", "str"),
    Field("Status", "enum", MESSAGE_STATUSES),
    Field("Size", "int"),
    Field("Subject", "str"),
    Field("DateReceived", "datetime"),
    Field("ExpirationTime", "datetime"),
    Field("RetryCount", "int"),
    Field("LastError", "str"),
    Field("InternetMessageId", "str"),
    Field("SourceIP", "str"),
    Field("Recipients", "list"),
    Field("RecipientDomains", "list"),
    Field("Age", "int", duration=True),
    Field("Site", "str"),
)


def _iso(ms: int) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) if ms else None


class SortError(MailyardError):
    pass


def _sorted(rows: list[dict[str, Any]], sort: str | None, properties: dict[str, str]) -> list[dict[str, Any]]:
    """Exchange's SortOrder: ``+Prop,-Prop`` (``-`` descending), property names case-insensitive."""
    if not sort:
        return rows
    by_name = {k.lower(): v for k, v in properties.items()} | {v: v for v in properties.values()}
    for part in reversed([p.strip() for p in sort.split(",") if p.strip()]):
        descending = part.startswith("-")
        name = part.lstrip("+-").lower()
        key = by_name.get(name)
        if key is None:
            raise SortError(f"cannot sort by {part.lstrip('+-')!r}: use one of {', '.join(properties)}")

        def sort_key(row: dict[str, Any], k: str = key) -> tuple[bool, Any]:
            value = row.get(k)
            return value is None, value or 0 if isinstance(value, int) else str(value or "").lower()

        rows.sort(key=sort_key, reverse=descending)
    return rows


def parse_filter(text: str | None, fields: str) -> Filter | None:
    """The filter in ``text`` (None for none); raises FilterError pointing at the bad part."""
    if text is None or not text.strip():
        return None
    return parse(text, QUEUE_FIELDS if fields == "queue" else MESSAGE_FIELDS)


# region: queues


def queue_rows(r: redis.Redis, *, server: str | None = None, filter: str | None = None,
               sort: str | None = None) -> list[dict[str, Any]]:
    """Get-Queue: every queue of the organization, or of ``server``'s site."""
    flt = parse_filter(filter, "queue")
    site = None
    if server:
        hub = next((h for h in registry.hubs(r) if h.name.lower() == server.lower()), None)
        if hub is None:
            raise NotFoundError(f"no hub named {server!r}; `mailyard site status` lists them")
        site = hub.site
    rows = []
    for q in RedisQueues.reader(r).queues():
        if site and q.site != site:
            continue
        row = q.as_dict()
        if flt is None or flt.matches({p: row[k] for p, k in QUEUE_PROPERTIES.items()}):
            rows.append(row)
    return _sorted(rows, sort, QUEUE_PROPERTIES)


# endregion

# region: messages


def _row(item: Item, msg: Message | None, now_ms: int, kind: QueueKind) -> dict[str, Any]:
    recipients = [
        {"address": rc.address,
         "status": (ItemStatus.RETRY if rc.status == ItemStatus.RETRY else ItemStatus.READY).value,
         "last_error": rc.last_error, "original": rc.original or rc.address, "type": rc.kind or "External"}
        for rc in item.recipients
    ]
    status = item.pending or item.status
    return {
        "identity": f"{item.queue}\\{item.id}",
        "id": item.id,
        "queue": item.queue,
        "queue_kind": kind.value,  # the queue's QueueKind (see QueueInfo.as_dict's "kind")
        "site": item.site,
        "internal_message_id": item.msg,
        "message_id": msg.message_id if msg else "",
        "from_address": msg.sender if msg else "",
        "subject": msg.subject if msg else "",
        "size": msg.size if msg else 0,
        "status": status,
        "date_received": _iso(item.enqueued),
        "expiration_time": _iso(msg.expires) if msg and kind is not QueueKind.POISON else None,
        "retry_count": item.retries,
        "last_error": item.last_error,
        "source_ip": msg.client if msg and msg.source == "SMTP" else "",
        "hub": item.hub if item.status == ItemStatus.ACTIVE else "",
        "recipients": recipients,
        "age_seconds": max(0, (now_ms - msg.received) // 1000) if msg else 0,
    }


def _filter_record(row: dict[str, Any]) -> dict[str, Any]:
    record = {p: row[k] for p, k in MESSAGE_PROPERTIES.items()}
    record["Recipients"] = [rc["address"] for rc in row["recipients"]]
    record["RecipientDomains"] = sorted({rc["address"].rpartition("@")[2] for rc in row["recipients"]})
    record["Age"] = row["age_seconds"]
    return record


def message_rows(r: redis.Redis, *, queues: Iterable[str] | None = None, filter: str | None = None,
                 sort: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Get-Message: the messages of ``queues`` (default: every queue), filtered and sorted."""
    flt = parse_filter(filter, "message")
    store = RedisQueues.reader(r)
    names = list(queues) if queues is not None else texts(r.zrange(keys.QUEUES, 0, -1))
    kinds = {q.identity: q.kind for q in store.queues(names)}
    for q in names:
        if q not in kinds:
            raise NotFoundError(f"no queue {q!r}; `mailyard queue list` shows them")
    now = int(time.time() * 1000)
    rows: list[dict[str, Any]] = []
    for q in names:
        start = 0
        while len(rows) < limit:
            ids = texts(r.zrange(keys.queue_members(q), start, start + 999))
            if not ids:
                break
            start += len(ids)
            items = store.items(ids)
            messages = store.messages([i.msg for i in items])
            for item in items:
                row = _row(item, messages.get(item.msg), now, kinds[q])
                if flt is None or flt.matches(_filter_record(row)):
                    rows.append(row)
                    if len(rows) >= limit:
                        break
            if flt is None and len(ids) < 1000:
                break
    return _sorted(rows, sort, MESSAGE_PROPERTIES)


def queue_messages(r: redis.Redis, queue: str, *, limit: int = 1000) -> list[dict[str, Any]]:
    return message_rows(r, queues=[queue], limit=limit)


# endregion
