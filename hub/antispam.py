"""The anti-spam agents of an Edge Transport server, in Exchange's order (reference §3):
connection filtering (mailyard.hub.connection_filter), sender filtering (sender_filter),
recipient filtering (recipient_filter), and at the end of DATA sender authentication (SPF,
DKIM, DMARC: sender_auth), content filtering by rspamd (content_filter) and attachment
filtering (attachment_filter).

They run only on an Edge (Exchange's AntispamAgentsEnabled is $true only there), and only for
sessions without the bypass right: a client that logged on, or an Exchange server (a hub by its
certificate), skips them all, as does a client on the IP Allow list. Every refusal is a FAIL
event in the tracking log (source AGENT, the agent and the reason in its context).

The message's SCL (``X-Mailyard-SCL``, which the mailbox server files into Junk Email above the
organization's ``scl_junk_threshold``) is the higher of rspamd's and DMARC's: a DMARC
``quarantine`` disposition (sender_auth.quarantined) asks for one just above the threshold,
stamped with content filtering off too. It is not held against the SCL reject and delete
thresholds: those judge rspamd's verdict, and DMARC asked for quarantine, not refusal.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mailyard import tracking
from mailyard.directory import Directory
from mailyard.hub import (
    attachment_filter,
    connection_filter,
    content_filter,
    mx,
    recipient_filter,
    sender_auth,
    sender_filter,
)
from mailyard.hub.receive_policy import Identity
from mailyard.tracking import Event, Record
from mailyard.txn import Txn

log = logging.getLogger("mailyard.hub.antispam")

CONNECTION = "Connection Filtering"
SENDER = "Sender Filter"
RECIPIENT = "Recipient Filter"
SENDER_ID = "Sender ID"  # (SPF, DKIM and DMARC, where Exchange had Sender ID)
ATTACHMENTS = "Attachment Filtering"
CONTENT = "Content Filter"


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


async def on_data(ctx: Any, directory: Directory, raw: bytes, ip: str, mail_from: str, helo: str,
                  authserv_id: str, recipients: list[str], original: bytes) -> str | tuple[bytes, list[str]]:
    """End of DATA: sender authentication (SPF, DKIM, DMARC). The refusal, or the message
    without results that claim to be ours, and the header lines to add."""
    settings = directory.org.antispam
    sender = "" if mail_from == "<>" else mail_from
    results = None
    if settings.sender_authentication:
        resolver = mx.resolver_for(directory.org.transport.dns_servers)
        try:
            # (on the message as it came: intake's re-encoding of over-long lines would break DKIM)
            results = await asyncio.to_thread(sender_auth.authenticate, resolver, original, ip, sender, helo)
        except Exception as exc:  # a message that makes a library fail is not refused for it
            log.warning("sender authentication failed on a message from %s: %r", ip, exc)
    found = results and sender_auth.refusal(results, spf_fail_action=settings.spf_fail_action,
                                            dmarc_enforce=settings.dmarc_enforce, ip=ip)
    if found:
        reply, why = found
        await _rejected(ctx, directory, SENDER_ID, why, ip, sender, [])
        return reply
    stamps = [results.header(authserv_id)] if results else []
    quarantine = results is not None and sender_auth.quarantined(results, dmarc_enforce=settings.dmarc_enforce)
    scls = [junk_scl(directory)] if quarantine else []  # (and rspamd's, below: the higher stands)
    role = directory.org.edge
    if settings.content_filtering and role is not None and role.rspamd:
        verdict = await content_filter.check(role.rspamd, raw, ip=ip, helo=helo, sender=sender, recipients=recipients)
        if verdict is not None:
            if settings.scl_delete_enabled and verdict.scl >= settings.scl_delete_threshold:
                await _rejected(ctx, directory, CONTENT, f"deleted: {verdict.summary}", ip, sender, recipients)
                return "250 2.6.0 Queued mail for delivery"  # (and dropped: SCLDeleteThreshold)
            if settings.scl_reject_enabled and verdict.scl >= settings.scl_reject_threshold:
                await _rejected(ctx, directory, CONTENT, f"rejected: {verdict.summary}", ip, sender, recipients)
                return f"550 5.7.1 {settings.content_reject_response}"
            scls.append(verdict.scl)
    if scls:
        stamps.append(f"{content_filter.SCL_HEADER}: {max(scls)}")
    try:  # (the email package on a large message: off the event loop)
        unacceptable = await asyncio.to_thread(attachment_filter.findings, raw, settings)
    except Exception as exc:  # (findings gives UNREADABLE for what it cannot read: this is a bug of ours)
        log.warning("attachment filtering failed on a message from %s: %r", ip, exc)
        unacceptable = [attachment_filter.UNREADABLE]
    if unacceptable:
        why = f"{settings.attachment_action}: {', '.join(unacceptable)[:400]}"
        await _rejected(ctx, directory, ATTACHMENTS, why, ip, sender, [])
        if settings.attachment_action == "SilentDelete":
            return "250 2.6.0 Queued mail for delivery"  # (and dropped: Exchange's SilentDelete)
        stripped = None
        if settings.attachment_action == "Strip":
            stripped = await asyncio.to_thread(attachment_filter.strip, raw, settings)
        if stripped is None:  # Reject, or a message too broken to strip: refused, not let through
            return f"550 5.7.1 {settings.attachment_reject_response}"
        raw = stripped
    return raw, stamps


def junk_scl(directory: Directory) -> int:
    """The SCL that files a message into Junk Email: one above the organization's threshold
    (none can be above 9: with the threshold at 9 nothing goes to Junk Email, by its choice)."""
    return min(directory.org.transport.scl_junk_threshold + 1, 9)


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
