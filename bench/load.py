"""The benchmark's SMTP load: C concurrent sessions inject M messages of S bytes to R
recipients, one connection per message (as Postfix's ``smtp-source -c`` does), and note the
moment each ``250`` after DATA came back."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class Load:
    host: str
    port: int
    messages: int
    size: int
    recipients: list[str]
    sessions: int = 20
    sender: str = "load@bench.example"
    source: str = "127.0.0.1"  # the address the load connects from (127.0.0.2: the hubs' Internet connector)
    rate: float = 0.0  # messages per second to start, all sessions together; 0: as fast as they can
    bounce_share: float = 0.0  # this share of messages goes to a recipient the sink refuses (550)
    bounced: set[str] = field(default_factory=set)  # the ids sent to such a recipient
    accepted: dict[str, float] = field(default_factory=dict)  # bench id -> time of 250
    refused: int = 0

    def body(self, ident: str) -> bytes:
        head = (f"From: {self.sender}\r\nTo: {', '.join(self.recipients)}\r\nSubject: bench {ident}\r\n"
                f"Message-ID: <{ident}@load.bench>\r\nX-Bench-Id: {ident}\r\n\r\n").encode()
        line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
        fill = max(2, self.size - len(head))
        return head + (line * (fill // len(line) + 1))[:fill - 2] + b"\r\n"  # DATA ends on a line of its own

    async def _reply(self, reader: asyncio.StreamReader) -> int:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return int(line[:3])

    def recipients_of(self, ident: str) -> list[str]:
        n = int(ident.rsplit("-", 1)[1])
        if self.bounce_share and n % round(1 / self.bounce_share) == 0:
            self.bounced.add(ident)
            return [f"bounce-{n}@{self.recipients[0].split('@')[1]}"]
        return self.recipients

    async def _one(self, ident: str) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port, local_addr=(self.source, 0))
        try:
            await self._reply(reader)
            writer.write(b"EHLO load.bench\r\n")
            await self._reply(reader)
            writer.write(f"MAIL FROM:<{self.sender}>\r\n".encode())
            if await self._reply(reader) != 250:
                self.refused += 1
                return
            for rcpt in self.recipients_of(ident):
                writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
                await self._reply(reader)
            writer.write(b"DATA\r\n")
            if await self._reply(reader) != 354:
                self.refused += 1
                return
            writer.write(self.body(ident) + b".\r\n")
            if await self._reply(reader) == 250:
                self.accepted[ident] = time.time()
            else:
                self.refused += 1
            writer.write(b"QUIT\r\n")
            await writer.drain()
        finally:
            writer.close()

    async def run(self, prefix: str) -> float:
        """Send everything; returns the wall time it took."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        for n in range(self.messages):
            queue.put_nowait(f"{prefix}-{n}")

        start = time.monotonic()
        started = 0

        async def session() -> None:
            nonlocal started
            while not queue.empty():
                ident = queue.get_nowait()
                if self.rate:  # paced: message n starts no earlier than n / rate after the first
                    started += 1
                    await asyncio.sleep(max(0.0, start + (started - 1) / self.rate - time.monotonic()))
                for _ in range(5):  # a refused connection or a 4xx is tried again, as MTAs do
                    try:
                        await self._one(ident)
                        if ident in self.accepted:
                            break
                    except (OSError, ConnectionError):
                        pass
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(session() for _ in range(self.sessions)))
        return time.monotonic() - start
