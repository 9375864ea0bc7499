"""Recipient filtering (Exchange's Recipient Filter agent), at RCPT TO on an Edge: an address on
the recipient block list, or an address of an accepted domain that EdgeSync did not list (its
salted hash is not in ``my:edge:recipients``), gets ``550 5.1.1 User unknown``, after the
receive connector's tarpit (a directory harvester waits 5 s for each guess)."""

from __future__ import annotations

import redis.asyncio

from mailyard import edgesync, keys
from mailyard.addresses import canonical
from mailyard.directory import Directory
from mailyard.org import AntispamSettings


async def refusal(r: redis.asyncio.Redis, directory: Directory, settings: AntispamSettings, salt: str,
                  rcpt: str) -> str | None:
    """Why ``rcpt`` is refused, for the log; None if it is not."""
    address = canonical(rcpt)
    if address in settings.blocked_recipients:
        return f"{address} is a blocked recipient"
    if settings.recipient_validation and directory.is_accepted(address) and salt:
        if address == directory.org.postmaster_address:
            return None
        if not await r.sismember(keys.EDGE_RECIPIENTS, edgesync.recipient_hash(salt, address)):
            return f"{address} is not a recipient of the organization (EdgeSync)"
    return None
