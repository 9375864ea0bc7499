"""CHUNKING (RFC 3030): the BDAT command on the receive connectors, beside DATA (``smtp_data``).

``BDAT <size> [LAST]`` is followed by exactly ``size`` octets of the message, taken as they
are: no dot-stuffing and no terminator, so nothing in a chunk can end the message early or
start a command (what makes DATA smuggling possible cannot happen here). The chunks of one
transaction add up to the message; ``BDAT … LAST`` (``BDAT 0 LAST`` too) ends it and hands it
to the handler exactly as DATA's end does, the same limits applied: the connector's size limit
to the octets of all chunks together; line ends and lengths are the intake's, as for DATA
(``mailyard.mime.intake``, in the handler).
BINARYMIME is not offered, so a message sent by BDAT is an ordinary RFC 5322 message.

The octets of a chunk are always read, whatever its command is answered: a client that
pipelines ``BDAT`` stays in step with us even when a chunk is refused (RFC 3030 §4.2). The reply
comes after the chunk. So:

- BDAT with no transaction (no EHLO, no MAIL, no RCPT yet, or after ``BDAT … LAST``): its
  octets are read and dropped, and it gets DATA's reply for the same case (``503``);
- a chunk that takes the message over the size limit gets ``552 5.3.4`` and ends the
  transaction (RFC 3030 §4.2: the client must send no more chunks); chunks it had already
  pipelined are read, dropped, and answered ``503 5.5.1 Need MAIL command``;
- DATA in a transaction that BDAT began is ``503 5.5.1 Bad sequence of commands`` (RFC 3030
  §2); RSET, EHLO and STARTTLS end the transaction, chunks included.

Chunks are read in pieces of at most ``PIECE`` octets, and those of a refused chunk are not
kept, so a client announcing a huge chunk makes us hold no more than the size limit.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiosmtpd.smtp import syntax

from mailyard.hub import replies
from mailyard.hub.smtp_pipelining import Pipelining

PIECE = 64 * 1024
COMMAND = re.compile(r"(?P<size>[0-9]{1,20})(?:[ \t]+(?P<last>LAST))?\Z", re.IGNORECASE | re.ASCII)


def parse(arg: str) -> tuple[int, bool] | None:
    """(chunk size, LAST) of a BDAT argument, or None if it is malformed."""
    found = COMMAND.match(arg.strip())
    return (int(found["size"]), found["last"] is not None) if found else None


async def read_chunk(reader: asyncio.StreamReader, size: int, into: bytearray | None) -> bool:
    """Read exactly ``size`` octets, appended to ``into`` (None: dropped). False if the
    connection ended first."""
    remaining = size
    while remaining:
        piece = await reader.read(min(remaining, PIECE))
        if not piece:
            return False
        remaining -= len(piece)
        if into is not None:
            into += piece
    return True


class Chunking(Pipelining):
    """aiosmtpd's session, with BDAT."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._chunks: bytearray | None = None  # the current transaction's message so far, if BDAT began it
        super().__init__(*args, **kwargs)

    def _set_post_data_state(self) -> None:
        # (aiosmtpd's transaction reset: after a message, and by RSET, EHLO, HELO and STARTTLS)
        super()._set_post_data_state()
        self._chunks = None

    async def refuse_data_after_bdat(self) -> bool:
        """For DATA: True (and the reply sent) if BDAT began this transaction."""
        if self._chunks is None:
            return False
        await self.push(replies.DATA_AFTER_BDAT)
        return True

    def _no_transaction(self) -> str | None:
        """The reply to a BDAT outside a transaction, DATA's for the same case; None if in one."""
        assert self.session is not None and self.envelope is not None
        if not self.session.host_name:
            return "503 Error: send EHLO first"
        if self.envelope.mail_from is None:
            return replies.NEED_MAIL
        if not self.envelope.rcpt_tos:
            return "503 Error: need RCPT command"
        return None

    @syntax("BDAT chunk-size [LAST]")
    async def smtp_BDAT(self, arg: str | None) -> None:
        command = parse(arg or "")
        if command is None:  # no size: nothing can be read, and the client is out of step anyway
            await self.push(replies.BDAT_SYNTAX)
            return
        size, last = command
        refusal = self._no_transaction()
        if refusal is None:
            if self._chunks is None:
                self._chunks = bytearray()
            if self.data_size_limit and len(self._chunks) + size > self.data_size_limit:
                refusal = replies.TOO_BIG
        if len(self._reader._buffer) < size:  # type: ignore[attr-defined]  # (as in smtp_pipelining)
            await self.flush_replies()  # we are about to wait for the client: it gets what it is owed first
        if not await read_chunk(self._reader, size, self._chunks if refusal is None else None):
            if self.transport is not None:
                self.transport.close()
            return
        if refusal is not None:
            if refusal == replies.TOO_BIG:
                self._set_post_data_state()  # the transaction has failed (RFC 3030 §4.2)
            await self.push(refusal)
            return
        if not last:
            await self.push(replies.chunk_received(size))
            return
        assert self.envelope is not None and self._chunks is not None
        content = bytes(self._chunks)
        self.envelope.content = self.envelope.original_content = content
        try:
            status = await self._call_handler_hook("DATA")
        finally:  # (a handler that raised: the transaction is over all the same, 451 follows)
            self._set_post_data_state()
        await self.push(status)
