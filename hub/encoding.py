"""SMTPUTF8 and 8BITMIME at a hub: what a message needs of the next hop, decided per
connection, and what a receive connector takes in.

In (``envelope_refusal``): an address that is not ASCII needs the SMTPUTF8 parameter on MAIL
FROM (RFC 6531 §3.4), else ``553 5.6.7``, as Postfix answers.

Out (``plan``), for one message on one connection, by what the peer's EHLO offers:

- ``SMTPUTF8`` goes on MAIL FROM when the message was sent with it (or, submitted through a
  mailbox, needs it) and the peer offers it; the addresses then go as UTF-8.
- Without it at the peer, a message that requires it (SMTPUTF8 requested, and a non-ASCII
  sender local part or non-ASCII header text: Postfix's rule) is not sent: every recipient
  gets ``550 5.6.7 SMTPUTF8 is required, but was not offered by host …`` and an NDR (RFC
  6531 §3.2, RFC 6533). A recipient whose own local part is not ASCII fails alike; the
  others go, with IDN domains as A-labels (an ASCII local part needs no SMTPUTF8).
- ``BODY=8BITMIME`` goes with a body that has 8-bit octets, where the peer offers it; a peer
  without it gets the message re-encoded as 7-bit MIME (``mailyard.mime.downgrade``: RFC 6152).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mailyard import mime
from mailyard.addresses import ascii_address, needs_smtputf8
from mailyard.hub import replies
from mailyard.hub.outcomes import Outcome


def envelope_refusal(address: str, smtputf8: bool) -> str | None:
    """MAIL FROM or RCPT TO: the reply to a non-ASCII address without SMTPUTF8, or None."""
    return None if smtputf8 or address.isascii() else replies.NEED_SMTPUTF8


@dataclass
class Transfer:
    """How one message goes over one connection."""

    sender: str  # as MAIL FROM says it
    options: list[str]  # MAIL FROM parameters
    encoding: str  # of MAIL FROM and RCPT TO: "utf-8" with SMTPUTF8, else "ascii"
    body: bytes
    recipients: dict[str, str] = field(default_factory=dict)  # ours -> as RCPT TO says it
    refused: dict[str, Outcome] = field(default_factory=dict)  # cannot go to this peer


def plan(sender: str, recipients: list[str], body: bytes, *, smtputf8: bool,
         offers: Callable[[str], bool], host: str) -> Transfer:
    """The transfer of one message to a peer whose EHLO ``offers`` extensions; ``host`` names
    it in a refusal."""
    if smtputf8 and offers("smtputf8"):
        transfer = Transfer(sender, ["SMTPUTF8"], "utf-8", body, {r: r for r in recipients})
    else:
        required = smtputf8 and (needs_smtputf8(sender) or not mime.split(body)[0].isascii())
        refusal = Outcome(550, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {host}")
        transfer = Transfer(ascii_address(sender) if sender else "", [], "ascii", body)
        for rcpt in recipients:
            if required or needs_smtputf8(rcpt):
                transfer.refused[rcpt] = refusal
            else:
                transfer.recipients[rcpt] = ascii_address(rcpt)
    if not body.isascii():
        if offers("8bitmime"):
            transfer.options.append("BODY=8BITMIME")
        else:
            seven_bit = mime.downgrade(body)
            if isinstance(seven_bit, mime.TooDeep):  # (cannot be converted: for this peer, never)
                refusal = Outcome(554, "5.6.3", f"Conversion to 7 bit for host {host}, which lacks 8BITMIME, "
                                                f"failed: {seven_bit}")
                transfer.refused.update(dict.fromkeys(transfer.recipients, refusal))
                transfer.recipients.clear()
            else:
                transfer.body = seven_bit
    if offers("size"):
        transfer.options.append(f"SIZE={len(transfer.body)}")
    return transfer
