"""Delivery status notifications (RFC 3464): NDRs and delay DSNs, in Exchange's words.

Pure functions that build the message bytes; the caller queues them like any other mail
from the null sender ``<>`` (so a DSN never causes another DSN).
"""

from __future__ import annotations

from dataclasses import dataclass
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP as SMTP_POLICY
from email.policy import SMTPUTF8 as SMTPUTF8_POLICY
from email.utils import formatdate, make_msgid

# Texts from Exchange 2007/2010 NDRs (reference/exchange-2010-transport.md §7).
RECIP_NOT_FOUND = "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found"
RECIP_LIMIT = "550 5.5.3 RESOLVER.ADR.RecipLimit; too many recipients"
SIZE_LIMIT = "550 5.3.4 ROUTING.SizeLimit; message size exceeds fixed maximum size for route"
EXPIRED = "550 4.4.7 QUEUE.Expired; message expired"
NO_ROUTE = "554 5.4.4 SMTPSEND.DNS.NonExistentDomain; nonexistent domain"
ROUTING_LOOP = "554 5.4.6 Hop count exceeded - possible mail loop"
REMOVED = "550 5.7.1 QUEUE.Admin; message deleted by administrative action"
DELAYED = "400 4.4.7 Message delayed"

_FRIENDLY = {
    "5.1.1": "The e-mail address you entered couldn't be found. Check the address and try again.",
    "5.5.3": "The message has too many recipients. Split it into several messages.",
    "5.3.4": "The message is larger than the organization allows.",
    "4.4.7": "The message couldn't be delivered before it expired.",
    "5.4.4": "The recipient's domain couldn't be found, or no route leads to it.",
    "5.4.6": "The message was passed around too many times (a mail loop).",
    "5.7.1": "The message was deleted by an administrator.",
}

_QP = Charset("utf-8")
_QP.body_encoding = QP


@dataclass(frozen=True)
class Failure:
    """One recipient's outcome, for the report."""

    recipient: str
    diagnostic: str  # the SMTP reply, e.g. "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found"
    original: str = ""
    remote_mta: str = ""

    @property
    def status(self) -> str:
        parts = self.diagnostic.split()
        if len(parts) > 1 and parts[1].count(".") == 2 and parts[1][0] in "245":
            return parts[1]
        return "5.0.0" if self.diagnostic.startswith("5") else "4.0.0"


def _header_block(raw: bytes) -> bytes:
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    return raw if end < 0 else raw[: end + 2]


def build(
    *,
    delayed: bool,
    reporting_mta: str,
    postmaster: str,
    recipient: str,
    original: bytes,
    original_subject: str,
    original_message_id: str,
    arrival: str,
    failures: list[Failure],
) -> tuple[bytes, str]:
    """The report's RFC 5322 bytes and its Message-ID."""
    outer = MIMEMultipart("report", report_type="delivery-status")
    message_id = make_msgid(domain=postmaster.rpartition("@")[2])
    outer["From"] = f"Postmaster <{postmaster}>"
    outer["To"] = recipient
    subject = original_subject.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    subject = f"Delivery delayed: {subject}" if delayed else f"Undeliverable: {subject}"
    # RFC 2047 when needed: the original's subject may hold any characters
    outer["Subject"] = subject if subject.isascii() else Header(subject, "utf-8").encode()
    outer["Date"] = formatdate(localtime=False)
    outer["Message-ID"] = message_id
    outer["Auto-Submitted"] = "auto-replied"
    if original_message_id:
        outer["In-Reply-To"] = original_message_id
        outer["References"] = original_message_id

    lines = []
    if delayed:
        lines.append("Delivery is delayed to these recipients or groups:\n")
    else:
        lines.append("Delivery has failed to these recipients or groups:\n")
    for f in failures:
        lines.append(f.recipient)
        lines.append(_FRIENDLY.get(f.status, "The message couldn't be delivered.") + "\n")
    if delayed:
        lines.append("The server will keep trying to deliver this message. You don't need to "
                     "resend it; you'll be notified if it can't be delivered.\n")
    lines.append("\nDiagnostic information for administrators:\n")
    lines.append(f"Generating server: {reporting_mta}\n")
    for f in failures:
        lines.append(f.recipient)
        if f.remote_mta:
            lines.append(f"Remote Server returned '{f.diagnostic}'")
        lines.append(f"#{f.diagnostic} ##\n")
    lines.append("Original message headers:\n")
    headers_text = _header_block(original).decode("utf-8", "replace")  # shown to the sender
    text = MIMEText("\n".join(lines) + "\n" + headers_text, "plain", _QP)  # type: ignore[arg-type]  # a Charset works
    outer.attach(text)

    status = MIMEBase("message", "delivery-status")
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["Arrival-Date"] = arrival
    blocks: list[Message | str] = [per_message]
    for f in failures:
        block = Message()
        if f.original and f.original != f.recipient:
            block["Original-Recipient"] = typed_address(f.original)
        block["Final-Recipient"] = typed_address(f.recipient)
        block["Action"] = "delayed" if delayed else "failed"
        block["Status"] = f.status
        if f.remote_mta:
            block["Remote-MTA"] = f"dns; {f.remote_mta}"
        block["Diagnostic-Code"] = f"smtp; {f.diagnostic}"
        blocks.append(block)
    status.set_payload(blocks)
    outer.attach(status)

    headers = MIMEBase("text", "rfc822-headers")
    # The original headers as they were; 8-bit bytes (not allowed in headers, but seen) become
    # "?" so that the report itself stays valid 7-bit MIME.
    headers.set_payload(_header_block(original).decode("ascii", "replace").replace("\ufffd", "?"))
    outer.attach(headers)
    # To a sender whose address is not ASCII the report is itself an SMTPUTF8 message (its To
    # header cannot be written otherwise); the delivery-status part stays ASCII either way.
    return outer.as_bytes(policy=SMTP_POLICY if recipient.isascii() else SMTPUTF8_POLICY), message_id


def typed_address(address: str) -> str:
    """A recipient field of the report: ``rfc822; a@b``, or for an address that is not ASCII
    RFC 6533's ``utf-8;`` type in its 7-bit form (``j\\x{FC}rgen@...``; ``+``, ``=`` and ``\\``
    escaped alike), which message/delivery-status requires."""
    if address.isascii():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(ch if "!" <= ch <= "~" and ch not in "+=\\" else f"\\x{{{ord(ch):02X}}}"
                               for ch in address)
