"""One mail transaction out: MAIL, RCPT for each recipient, DATA and the message, pipelined
(RFC 2920) where the peer offers PIPELINING.

Without pipelining a transaction costs a round trip per command: 3 + R for R recipients (4 +
R after a failed one, with its RSET). Pipelined, RSET, MAIL, the RCPTs and DATA go in one
write and the message in a second: two round trips whatever R. ``bench/pipelining.py``
measures it over one connection to an aiosmtpd sink on loopback that delays each reply (the
README there has the table): at 10 ms a round trip, 23 messages a second become 44 with one
recipient, 7 become 41 with 10 and 1.8 become 38 with 50; with no delay at all it still
takes 0.30 ms of the client's CPU a message instead of 0.48 (one recipient; 0.9 instead of
5.6 with 50), so it is used wherever the peer offers it.

aiosmtplib sends one command and then waits for its reply: it has no pipelining, and its
protocol parses at most one reply per received segment and drops what arrives while a parsed
reply waits to be read. So ``exchange`` writes a group of commands at once and reads their
replies in order through ``_Protocol``, aiosmtplib's protocol with two changes: bytes that
arrive behind a reply not yet read are kept, and a reply already in the buffer is taken
before waiting for more. A group holds at most ``MAX_GROUP`` commands, so that its replies fit
aiosmtplib's reply buffer (32 KB).

Every reply is checked (RFC 2920 §3.1): a recipient's outcome is MAIL's reply if MAIL was
refused, else its RCPT's, else the reply to the message. A peer that answers ``354`` though it
took no recipient gets a lone ``.``, as RFC 2920 §3.1 says.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import PERIOD_REGEX, SMTPProtocol, normalize_message_line_endings

MAX_GROUP = 100
_CONTROL = frozenset(range(0x20)) | {0x7F}


class _Protocol(SMTPProtocol):
    """aiosmtplib's protocol, able to read the replies to a group of commands."""

    def data_received(self, data: bytes) -> None:
        waiter = self._response_waiter
        if self._response_pending and waiter is not None and waiter.done():
            self._buffer.extend(data)  # behind a reply not read yet: the next command's (aiosmtplib would drop it)
            return
        super().data_received(data)

    async def read_response(self, timeout: float | None = None) -> aiosmtplib.SMTPResponse:
        buffered = self._read_response_from_buffer()
        return buffered if buffered is not None else await super().read_response(timeout)


async def exchange(smtp: aiosmtplib.SMTP, commands: list[bytes], timeout: float) -> list[aiosmtplib.SMTPResponse]:
    """Send ``commands`` (without CRLF) in one write and return their replies, in order."""
    if any(_CONTROL.intersection(command) for command in commands):
        raise ValueError("an SMTP command with a control character")  # (aiosmtplib refuses them too)
    return await _send(smtp, b"".join(command + b"\r\n" for command in commands), len(commands), timeout)


async def _send(smtp: aiosmtplib.SMTP, data: bytes, replies: int, timeout: float) -> list[aiosmtplib.SMTPResponse]:
    """Write ``data`` and read ``replies`` replies. A lost connection or a timeout closes
    ``smtp`` and raises, as aiosmtplib's own commands do."""
    protocol = smtp.protocol
    if protocol is None or not smtp.is_connected:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    if type(protocol) is SMTPProtocol:
        protocol.__class__ = _Protocol  # (behaviour only, no state of its own; aiosmtplib makes the protocol)
    try:
        protocol.write(data)
        return [await protocol.read_response(timeout=timeout) for _ in range(replies)]
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        raise


@dataclass
class Transaction:
    """What became of one message's transaction."""

    replies: dict[str, aiosmtplib.SMTPResponse] = field(default_factory=dict)  # per recipient
    open: bool = False  # a transaction is left open: RSET before the next one


async def transaction(smtp: aiosmtplib.SMTP, sender: str, recipients: list[str], body: bytes, options: list[str], *,
                      rset: bool, timeout: float, encoding: str = "ascii") -> Transaction:
    """One message to ``recipients`` (RSET first if ``rset``), pipelined if the peer offers it;
    addresses in ``encoding`` ("utf-8" with SMTPUTF8)."""
    mail = b" ".join([b"MAIL FROM:" + quote_address(sender).encode(encoding), *(o.encode("ascii") for o in options)])
    rcpts = [b"RCPT TO:" + quote_address(r).encode(encoding) for r in recipients]
    commands = [b"RSET"] * rset + [mail, *rcpts, b"DATA"]
    done = Transaction()
    if smtp.supports_extension("pipelining"):
        groups = [commands[i:i + MAX_GROUP] for i in range(0, len(commands), MAX_GROUP)]
        answers = [reply for group in groups for reply in await exchange(smtp, group, timeout)]
    else:
        answers = []
        for i, command in enumerate(commands):
            answers += await exchange(smtp, [command], timeout)
            # (as a client without pipelining: no RCPT after a refused MAIL, no DATA without a recipient)
            if command is mail and answers[-1].code != 250:
                break
            if i == len(commands) - 2 and not any(a.code in (250, 251) for a in answers[-len(rcpts):]):
                break
    answers = answers[rset:]
    if answers[0].code != 250:  # MAIL refused: every recipient gets its reply
        done.replies = dict.fromkeys(recipients, answers[0])
        return done
    done.open = True
    accepted = []
    for rcpt, reply in zip(recipients, answers[1:1 + len(rcpts)], strict=True):
        if reply.code in (250, 251):
            accepted.append(rcpt)
        else:
            done.replies[rcpt] = reply
    data = answers[1 + len(rcpts)] if len(answers) > 1 + len(rcpts) else None
    if data is None or data.code != 354:
        done.replies.update(dict.fromkeys(accepted, data) if data else {})
        return done
    message = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(body)) if accepted else b""
    (final,) = await _send(smtp, message + b".\r\n", 1, timeout)
    done.replies.update(dict.fromkeys(accepted, final))
    done.open = not accepted or final.code != 250
    return done
