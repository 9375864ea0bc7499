"""The receive connectors' aiosmtpd handler: each command's decision, and the durable enqueue.

aiosmtpd's session (``receive_protocol``) calls the handler's hooks: ``authenticate`` for
AUTH, then ``handle_EHLO``, ``handle_MAIL``, ``handle_RCPT`` and ``handle_DATA``. MAIL, RCPT
and AUTH are answered as ``receive_policy`` decides. At DATA the handler checks the hop count,
strips the organization's headers (keeping a relaying hub's origin id, from hubs only), adds
the hub's ``Received`` header (and a ``Message-ID`` when there is none) and stores the message
in the Submission queue with a RECEIVE event, in one Redis transaction; ``250`` is sent only
once that transaction is durable (with transport ``durability`` ``replica``: once a replica
has it, else ``451 4.3.0``; mailyard.durability). The categorizer takes it from there.
"""

from __future__ import annotations

import inspect
import logging
import time
from email.utils import formatdate, make_msgid
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, TLSSetupException

from mailyard import durability, headers, mime
from mailyard.hub import address_rewrite, antispam, content_filter, encoding, replies, sender_auth
from mailyard.hub import receive_policy as policy
from mailyard.hub.intake import accept
from mailyard.hub.receive_policy import Identity
from mailyard.hub.receive_protocol import ReceiveContext, ReceiveProtocol, aiosmtpd_members
from mailyard.hub.records import Message, new_message_id
from mailyard.hub.redis_queues import item_ids
from mailyard.hub.relay import INTERNAL_HEADER, ORG_HEADERS, ORIGIN_HEADER, from_organization
from mailyard.tracking import Event, Record

log = logging.getLogger("mailyard.hub.receive")


def _from_organization_node(identity: Identity | None) -> bool:
    """A hub (or Edge) of the organization that proved itself by certificate."""
    return identity is not None and identity.organization_node


class ReceiveHandler:
    """The aiosmtpd handler: MAIL, RCPT and DATA decisions, and the durable enqueue."""

    def __init__(self, ctx: ReceiveContext) -> None:
        self.ctx = ctx

    def __dir__(self) -> list[str]:
        return aiosmtpd_members(type(self), ("handle_", "auth_"))

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                     auth_data: Any) -> AuthResult:
        state = server.state if isinstance(server, ReceiveProtocol) else None
        if not isinstance(auth_data, LoginPassword) or state is None:
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "replace").strip()
        identity = policy.logon(self.ctx.directory(), state.connector, login, auth_data.password)
        if identity is None:
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=identity)

    @staticmethod
    def _identity(server: ReceiveProtocol, session: Session) -> Identity | None:
        """Who logged on in this session; else who the connector trusts without a logon."""
        data = session.auth_data
        if session.authenticated and isinstance(data, Identity):
            return data
        return server.state.rules.implicit if server.state else None

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        last = responses.pop()  # "250 HELP"
        responses = [r for r in responses if r.rstrip() != "250-AUTH"]  # AUTH with no mechanism
        responses.append("250-ENHANCEDSTATUSCODES")
        responses += ["250-PIPELINING", "250-CHUNKING"]  # as Exchange 2010 (smtp_pipelining, smtp_bdat)
        responses.append(last)
        return responses

    async def handle_MAIL(self, server: ReceiveProtocol, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        state = server.state
        assert state is not None
        identity = self._identity(server, session)
        try:
            sender = policy.mail_from(state.connector, identity, address, self.ctx.directory())
        except policy.Refused as refused:
            return refused.reply
        if refusal := encoding.envelope_refusal(address, envelope.smtp_utf8):
            return refusal
        if refusal := policy.pressure_refusal(self.ctx.level, policy.is_internal(identity)):
            return refusal
        directory = self.ctx.directory()
        if antispam.applies(directory, identity, state.antispam, state.client_ip) and (
                refusal := await antispam.on_mail(self.ctx, directory, state.antispam, state.client_ip, sender)):
            return refusal
        server.data_size_limit = policy.size_limit(state.connector, identity)
        envelope.mail_from = sender or "<>"  # aiosmtpd needs it non-empty to see a MAIL happened
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK

    async def handle_RCPT(self, server: ReceiveProtocol, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        state = server.state
        assert state is not None
        identity = self._identity(server, session)
        directory = self.ctx.directory()
        try:
            rcpt = policy.rcpt_to(state.connector, identity, address, directory, taken=len(envelope.rcpt_tos))
        except policy.Refused as refused:
            return refused.reply
        if refusal := encoding.envelope_refusal(address, envelope.smtp_utf8):
            return refusal
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from or ""
        if directory.edge and not _from_organization_node(identity):  # (Address Rewriting Inbound: first)
            rcpt = address_rewrite.inbound(directory.org.address_rewrites, rcpt)
        if antispam.applies(directory, identity, state.antispam, state.client_ip) and (
                refusal := await antispam.on_rcpt(self.ctx, directory, state.antispam, state.client_ip, sender, rcpt)):
            return refusal
        if rcpt not in envelope.rcpt_tos:
            envelope.rcpt_tos.append(rcpt)
            envelope.rcpt_options.extend(rcpt_options)
        return replies.RECIPIENT_OK

    async def handle_DATA(self, server: ReceiveProtocol, session: Session, envelope: Envelope) -> str:
        state = server.state
        assert state is not None
        raw = envelope.original_content or b""
        identity = self._identity(server, session)
        directory = self.ctx.directory()
        try:
            policy.check_hops(state.connector, identity, raw, org_hops=len(directory.org.sites))
        except policy.Refused as refused:
            return refused.reply
        head = headers.parse(raw)
        if refusal := policy.header_senders_refusal(directory, identity, head):
            log.info("refused a message from %s logged on as %s: %s", state.client_ip,
                     identity.name if identity else "?", refusal)
            return replies.SEND_AS_DENIED
        origin = policy.relay_origin(identity, head.get(ORIGIN_HEADER))
        internal = from_organization(identity, head.get(INTERNAL_HEADER))
        raw = headers.strip(raw, *ORG_HEADERS)
        if not _from_organization_node(identity):  # (an Edge's verdict, from an Edge only)
            raw = headers.strip(raw, content_filter.SCL_HEADER)
        size = len(raw)
        taken = mime.intake(raw)  # once, on the way in: CRLF line ends, no line too long for SMTP
        if isinstance(taken, mime.Unfit):
            return replies.header_refused(taken)
        raw = taken
        if identity is not None and identity.kind == "user" and (bad := headers.malformed_line(mime.split(raw)[0])):
            # (what a reader skips, a mail client may show, "From : the CEO" among them: the
            # send-as check above cannot see it)
            return replies.header_refused(f"header line {bad[0]} is not a header field (name: value)")
        extra: list[str] = []
        if directory.edge and antispam.applies(directory, identity, state.antispam, state.client_ip):
            raw = sender_auth.strip_results(raw, {state.connector.fqdn or self.ctx.fqdn})
            checked = await antispam.on_data(self.ctx, directory, raw, state.client_ip, envelope.mail_from or "",
                                             policy.received_name(session.host_name),
                                             state.connector.fqdn or self.ctx.fqdn, list(envelope.rcpt_tos),
                                             original=envelope.original_content or b"")
            if isinstance(checked, str):
                return checked
            raw, extra = checked
        elif directory.edge and not _from_organization_node(identity):
            # (a session that skips the agents, the IP Allow list's: no results in our name either)
            raw = sender_auth.strip_results(raw, {state.connector.fqdn or self.ctx.fqdn})
        elif directory.org.edge_subscriptions and not _from_organization_node(identity):
            # what only a subscribed Edge may write: its results (a hub's header firewall)
            raw = sender_auth.strip_results(raw, {e.fqdn for e in directory.org.edge_subscriptions})
        if directory.edge and not _from_organization_node(identity):
            raw = address_rewrite.inbound_message(directory.org.address_rewrites, raw)
        now_s = time.time()
        now = int(now_s * 1000)
        settings = directory.org.transport
        msg = Message(
            id=new_message_id(), sender="" if envelope.mail_from == "<>" else envelope.mail_from or "",
            received=now, expires=now + int(settings.message_expiration_timeout * 1000),
            source="SMTP", origin=origin, site=self.ctx.site, hub=self.ctx.hub, client=state.client_ip,
            smtputf8=envelope.smtp_utf8, internal=internal,
        )
        message_id = str(head.get("Message-ID", "")).strip()
        if not message_id:
            message_id = make_msgid(domain=self.ctx.fqdn)
            extra.append(f"Message-ID: {message_id}")
        if head.get("Date") is None:  # RFC 5322 requires one; Exchange adds it
            extra.append(f"Date: {formatdate(now_s, localtime=False)}")
        msg.message_id = message_id
        msg.subject = headers.text(head, "Subject")[:500]
        with_ = ("UTF8SMTP" if envelope.smtp_utf8 else "ESMTP") + ("S" if session.ssl else "") + (
            "A" if session.authenticated else "")  # RFC 3848, RFC 6531 4.3
        helo = policy.received_name(session.host_name)
        received = (f"Received: from {helo} ([{state.client_ip}]) by {self.ctx.fqdn} (Mailyard) with {with_}"
                    f" id {msg.id}; {formatdate(now_s, localtime=False)}")
        body = headers.prepend(raw, received, *extra)
        # The size as received, which the limits apply to (Exchange's OriginalSize): our own trace
        # headers must not turn a message accepted at exactly the limit into a 5.3.4 bounce.
        msg.size = size
        dedup = f"{origin}:{','.join(sorted(envelope.rcpt_tos))}" if origin else None
        try:
            replicated = await durability.replicated_async(settings.durability, self.ctx.r)
            (item_id,) = await item_ids.take_async(self.ctx.r, 1)
            change = accept(
                self.ctx.queues.change(), msg, body, list(envelope.rcpt_tos), item_id=item_id, settings=settings,
                now=now, dedup=dedup,
                record=Record(Event.RECEIVE, source="SMTP", server=self.ctx.hub, client=state.client_ip,
                              connector=f"{self.ctx.hub}\\{state.connector.name}",
                              message_id=message_id, recipients=list(envelope.rcpt_tos),
                              sender=msg.sender, subject=msg.subject, size=msg.size,
                              context=f"helo={helo}" + (f", origin={origin}" if origin else "")),
            )
            result = change.committed(await self.ctx.commits.run(change.txn, replicated=replicated))
        except Exception as exc:  # Redis down: the client keeps the message and tries again
            if unconfirmed := durability.unreplicated(exc):
                # (perhaps stored on the primary: a relay's retry is deduplicated by its origin)
                log.warning("not acknowledging a message from %s: %s", state.client_ip, unconfirmed.reason)
                return replies.not_replicated(unconfirmed.reason)
            log.error("could not store a message from %s: %s", state.client_ip, exc)
            return replies.STORAGE_FAILED
        if not result.ok:
            # "new": our own change had been applied before a lost reply made the Redis client
            # send it again; "first": a relay repeated after a lost reply. Queued once.
            existing = msg.id if result.failed == "new" else result.value or ""
            return replies.queued(message_id, existing, self.ctx.hub)
        return replies.queued(message_id, msg.id, self.ctx.hub)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # the client's fault: no traceback per bad client
            log.warning("TLS handshake failed: %r", error.__cause__)
            return "454 4.7.0 TLS negotiation failed"  # (aiosmtpd closes the connection instead)
        log.exception("SMTP session error", exc_info=error)
        return "451 4.3.0 Local error in processing"


# aiosmtpd reads handle_EHLO's signature on every connection (to tell its two forms apart):
# a precomputed one saves inspect's work, a tenth of a millisecond per session.
# (typeshed declares no __signature__ on functions, though inspect reads it: hence the ignore.)
ReceiveHandler.handle_EHLO.__signature__ = inspect.signature(ReceiveHandler.handle_EHLO)  # type: ignore[attr-defined]
