"""Recipient filtering (Exchange's Recipient Filter agent), at RCPT TO on an Edge: an address on
the recipient block list, or an address of an accepted domain that EdgeSync did not list (its
salted hash is not in ``my:edge:recipients``), gets ``550 5.1.1 User unknown``, after the
receive connector's tarpit (a directory harvester waits 5 s for each guess). A group that takes
mail only from authenticated senders gets the hub's refusal (``550 5.7.1 ... AuthRequired``);
postmaster of every accepted domain is taken (RFC 5321 4.5.1). Until EdgeSync has brought
recipients at all, an address of an accepted domain is ``451 4.3.2``: not known yet is not
unknown."""

from __future__ import annotations

import redis.asyncio

from mailyard import edgesync, keys
from mailyard.addresses import canonical
from mailyard.directory import Directory
from mailyard.hub import replies
from mailyard.org import AntispamSettings

UNKNOWN = "550 5.1.1 User unknown"
NOT_SYNCED = "451 4.3.2 The recipients of this domain are not known yet; try again later"


async def refusal(r: redis.asyncio.Redis, directory: Directory, settings: AntispamSettings, salt: str,
                  rcpt: str) -> tuple[str, str] | None:
    """(the reply, why, for the log) when ``rcpt`` is refused; None if it is not."""
    address = canonical(rcpt)
    if address in settings.blocked_recipients:
        return UNKNOWN, f"{address} is a blocked recipient"
    if not directory.is_accepted(address) or address.partition("@")[0] == "postmaster":
        return None
    hashed = edgesync.recipient_hash(salt, address)
    pipe = r.pipeline(transaction=False)
    pipe.sismember(keys.EDGE_RECIPIENTS, hashed)
    pipe.sismember(keys.EDGE_CLOSED_GROUPS, hashed)
    pipe.hexists(keys.EDGE_STATE, "recipients_at")
    known, closed, synced = await pipe.execute()
    if closed:
        return replies.AUTH_REQUIRED, f"{address} takes mail only from authenticated senders"
    if settings.recipient_validation and not known:
        if not synced:
            return NOT_SYNCED, "EdgeSync has brought no recipients yet"
        return UNKNOWN, f"{address} is not a recipient of the organization (EdgeSync)"
    return None
