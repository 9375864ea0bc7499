"""The anti-spam agents of an Edge Transport server, in Exchange's order (reference §3):
connection filtering (mailyard.hub.connection_filter), sender filtering (sender_filter),
recipient filtering (recipient_filter). (The agents at the end of DATA, SPF/DMARC, content
and attachment filtering, are not built yet.)

They run only on an Edge (Exchange's AntispamAgentsEnabled is $true only there), and only for
sessions without the bypass right: a client that logged on, or an Exchange server (a hub by its
certificate), skips them all, as does a client on the IP Allow list. Every refusal is a FAIL
event in the tracking log (source AGENT, the agent and the reason in its context).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mailyard import tracking
from mailyard.directory import Directory
from mailyard.hub import connection_filter, mx, recipient_filter, sender_filter
from mailyard.hub.receive_policy import Identity
from mailyard.tracking import Event, Record
from mailyard.txn import Txn

log = logging.getLogger("mailyard.hub.antispam")

CONNECTION = "Connection Filtering"
SENDER = "Sender Filter"
RECIPIENT = "Recipient Filter"


def applies(directory: Directory, identity: Identity | None, session: dict[str, Any], ip: str) -> bool:
    """Do the agents look at this session? (An Edge, no bypass right, not on the allow list.)"""
    if not directory.edge or identity is not None:
        return False
    if "allowed" not in session:
        session["allowed"] = connection_filter.allowed(directory.org.antispam, ip)
    return not session["allowed"]


async def on_mail(ctx: Any, directory: Directory, session: dict[str, Any], ip: str, sender: str) -> str | None:
    """MAIL FROM: the IP Block list, then the sender filter. The reply, or None."""
    settings = directory.org.antispam
    if reply := connection_filter.blocked_reply(settings, ip):
        await _rejected(ctx, directory, CONNECTION, f"{ip} is on the IP Block list", ip, sender, [])
        return reply
    if why := sender_filter.refusal(settings, sender):
        await _rejected(ctx, directory, SENDER, why, ip, sender, [])
        return sender_filter.DENIED
    return None


async def on_rcpt(ctx: Any, directory: Directory, session: dict[str, Any], ip: str, sender: str,
                  rcpt: str) -> str | None:
    """RCPT TO: the block list providers (once a session), then the recipient filter."""
    settings = directory.org.antispam
    if settings.block_list_providers:
        if "listed" not in session:
            resolver = mx.resolver_for(directory.org.transport.dns_servers)
            session["listed"] = await asyncio.to_thread(connection_filter.check, resolver, settings, ip)
        if session["listed"] is not None:
            reply, why = session["listed"]
            await _rejected(ctx, directory, CONNECTION, why, ip, sender, [rcpt])
            return str(reply)
    role = directory.org.edge
    salt = role.recipient_salt if role else ""
    if found := await recipient_filter.refusal(ctx.r, directory, settings, salt, rcpt):
        reply, why = found
        await _rejected(ctx, directory, RECIPIENT, why, ip, sender, [rcpt])
        return reply
    return None


async def _rejected(ctx: Any, directory: Directory, agent: str, why: str, ip: str, sender: str,
                    recipients: list[str]) -> None:
    log.info("%s refused %s (from %s): %s", agent, recipients or sender or "<>", ip, why)
    txn = Txn()
    tracking.add(txn, Record(Event.FAIL, source="AGENT", server=ctx.hub, client=ip, sender=sender,
                             recipients=recipients, context=f"{agent}: {why}"),
                 directory.org.transport.message_tracking_log_max_age)
    try:
        await txn.run_async(ctx.r)
    except Exception as exc:  # (the refusal stands; only its log line is lost)
        log.warning("could not log %s's refusal: %s", agent, exc)
