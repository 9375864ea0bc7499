"""A loopback TCP proxy that can cut the network: partitions for the fault tests.

Modes, switchable while connections are open:
- ``forward``: bytes flow both ways;
- ``blackhole``: connections stay open but nothing flows either way (a partition, as when a
  switch dies: no reset, just silence); what arrives meanwhile is dropped, and a side that
  closes its connection meanwhile is seen to close only when the partition heals;
- ``drop_replies``: requests reach the server, replies are thrown away (the half-open case
  that makes a BRPOP reply vanish);
- ``reset()``: close every connection at once.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Literal

Mode = Literal["forward", "blackhole", "drop_replies"]


class Proxy:
    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0,
                 password: str | None = None) -> None:
        self.target = (target_host, target_port)
        self.password = password  # the target Redis's, for url()
        self.host = host
        self.port = port
        self.mode: Mode = "forward"
        self.dropped = 0  # bytes thrown away
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()  # one per connection, until both sides are closed
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/{db}"

    def start(self) -> Proxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(10)
        return self

    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pump(reader, up_writer, upstream=True),
                             self._pump(up_reader, writer, upstream=False), return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                # A close is news that crosses the network too: during a blackhole the other
                # side hears of it only once the network heals (TCP sends the FIN again).
                while self.mode == "blackhole" and not writer.is_closing():
                    await asyncio.sleep(0.05)
                writer.close()
                return
            if self.mode == "blackhole" or (self.mode == "drop_replies" and not upstream):
                self.dropped += len(data)
                continue
            writer.write(data)
            await writer.drain()

    def set_mode(self, mode: Mode) -> None:
        self.mode = mode

    def reset(self) -> None:
        """Close every open connection (both sides), as a restarted firewall would."""
        def close_all() -> None:
            for w in list(self._writers):
                w.close()
        self._loop.call_soon_threadsafe(close_all)

    def stop(self) -> None:
        """Close the listener and every connection (nothing to do if never started, or stopped)."""
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server:
                self._server.close()
            for w in list(self._writers):
                w.close()
            if self._tasks:  # (each ends once its pumps saw their connections close)
                _, pending = await asyncio.wait(set(self._tasks), timeout=2)
                for t in pending:
                    t.cancel()
        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
