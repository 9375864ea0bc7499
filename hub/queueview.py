"""Read-only views of the queues for the CLI and the Queue Viewer (Get-Queue, Get-Message)."""

from __future__ import annotations

import time
from typing import Any

import redis

from mailyard import keys
from mailyard.errors import NotFoundError
from mailyard.hub.queues import load_items, load_messages


def _iso(ms: int) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def queue_messages(r: redis.Redis, queue: str, *, limit: int = 1000) -> list[dict[str, Any]]:
    if not r.exists(keys.queue(queue)):
        raise NotFoundError(f"no queue {queue!r}; `mailyard queue list` shows them")
    ids = [i.decode() for i in r.zrange(keys.queue_members(queue), 0, limit - 1)]
    items = load_items(r, ids)
    messages = load_messages(r, [i.msg for i in items])
    out = []
    for item in items:
        msg = messages.get(item.msg)
        out.append({
            "identity": f"{queue}\\{item.id}",
            "id": item.id,
            "internal_message_id": item.msg,
            "message_id": msg.message_id if msg else "",
            "from_address": msg.sender if msg else "",
            "subject": msg.subject if msg else "",
            "size": msg.size if msg else 0,
            "status": item.status,
            "date_received": _iso(item.enqueued),
            "expiration_time": _iso(msg.expires) if msg else None,
            "retry_count": item.retries,
            "last_error": item.last_error,
            "hub": item.hub if item.status == "Active" else "",
            "recipients": [
                {"address": rc.address, "status": rc.status, "last_error": rc.last_error,
                 "original": rc.original or rc.address, "type": rc.kind}
                for rc in item.recipients
            ],
        })
    return out
