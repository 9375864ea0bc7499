"""PIPELINING (RFC 2920) on the receive connectors: replies to a pipelined group go out together.

aiosmtpd already reads pipelined commands one after another from its stream buffer and never
loses input, so serving PIPELINING is only about replies: aiosmtpd writes (and drains) each
one on its own, so a client's group of MAIL, 50 RCPTs and DATA gets 52 TCP segments back.
RFC 2920 §3.2 lets a server keep replies to grouped commands and send them as one unit, as
long as it sends everything before it waits for more input. So a reply is held back only
while the client's next command line is already in the buffer (it will be answered without
waiting), only for replies after which the session goes on reading commands as usual (not a
3xx, STARTTLS's 220, 221, 421 or anything that ends in a close), and at most ``MAX_HELD`` of
them; the next reply that is not held takes them all along in one write. Whoever is about to
wait for input other than a command line (a BDAT chunk) calls ``flush_replies`` first, and so
must whoever closes the connection after a reply in ``GROUPABLE`` (a held reply is lost with
the connection).
"""

from __future__ import annotations

from typing import Any

from aiosmtpd.smtp import SMTP

MAX_HELD = 100
# Replies that may wait for the next one: each answers a command a client may pipeline
# (MAIL, RCPT, RSET, NOOP, VRFY, the end of a message or a BDAT chunk), and after each the
# session just reads the next command. 535 is not here: a failed logon may close the connection.
GROUPABLE = frozenset(f"{code} " for code in (250, 251, 252, 451, 452, 500, 501, 503, 530, 550, 551, 552, 553, 554,
                                               555))


class Pipelining(SMTP):
    """aiosmtpd's session, with the replies to a pipelined group sent in one write."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: list[str] = []

    def _next_command_buffered(self) -> bool:
        # (aiosmtpd reads command lines up to LF; typeshed does not declare StreamReader's buffer)
        return b"\n" in self._reader._buffer  # type: ignore[attr-defined]

    async def push(self, status: str | bytes) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        final = text[text.rfind("\n") + 1:]  # the last line of the reply (EHLO's come as one text)
        if final[:4] in GROUPABLE and len(self._held) < MAX_HELD and self._next_command_buffered():
            self._held.append(text)
            return
        if self._held:
            text = "\r\n".join([*self._held, text])
            self._held.clear()
        await super().push(text)

    async def flush_replies(self) -> None:
        """Send the replies held back, before waiting for input that is not a command line."""
        if self._held:
            text = "\r\n".join(self._held)
            self._held.clear()
            await super().push(text)
