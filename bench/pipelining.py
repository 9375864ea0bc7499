"""What pipelining (RFC 2920) gains on the way out: messages per second over one connection
to an SMTP sink on loopback that delays every reply by D ms (a round trip of D ms, as to a
distant MX), for R recipients per message, three ways:

- ``aiosmtplib``: its ``mail``, ``rcpt`` and ``data``, one command then its reply (how
  ``hub/send.py`` sent before);
- ``sequential``: ``hub/send_transaction.py`` to a sink that offers no PIPELINING (the same
  lock step, through our own reading of replies);
- ``pipelined``: ``hub/send_transaction.py`` to a sink that offers PIPELINING (MAIL, the
  RCPTs and DATA in one write, the message in a second).

Also the client's CPU milliseconds per message (at D = 0 that is all a message costs). Each
cell sends messages for at most ``--seconds`` seconds (and at most ``--messages``); the sink
runs in a process of its own. ``python bench/pipelining.py [--delays 0,5,20] [--recipients
1,10,50]``; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailyard.hub.send_transaction import transaction

BODY = b"From: load@bench.example\r\nSubject: pipelining\r\n\r\n" + b"Lorem ipsum dolor sit amet.\r\n" * 160  # ~5 KB


# region: the sink


class Handler:
    def __init__(self, pipelining: bool) -> None:
        self.pipelining = pipelining

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]] if self.pipelining else responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 OK"


class DelayedSMTP(SMTP):
    """aiosmtpd's server, every reply sent ``delay`` seconds late (in order: latency, not a
    slower server; replies to pipelined commands travel together)."""

    def __init__(self, handler: Handler, delay: float) -> None:
        super().__init__(handler, hostname="sink.bench", ident="bench sink", data_size_limit=None)
        self.delay = delay
        self._last = 0.0

    async def push(self, status: str | bytes) -> None:
        data = (status.encode() if isinstance(status, str) else status) + b"\r\n"
        when = max(self.loop.time() + self.delay, self._last + 1e-6)  # (call_at keeps strictly later ones in order)
        self._last = when
        self.loop.call_at(when, self._write, data)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(data)


async def sink(delay_ms: float, pipelining: bool) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: DelayedSMTP(Handler(pipelining), delay_ms / 1000), "127.0.0.1", 0)
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    server.close()


# endregion

# region: the client


async def old_transaction(smtp: aiosmtplib.SMTP, recipients: list[str]) -> None:
    """The lock step as hub/send.py did it with aiosmtplib before pipelining."""
    await smtp.mail("load@bench.example", options=[f"SIZE={len(BODY)}"])
    for rcpt in recipients:
        await smtp.rcpt(rcpt)
    await smtp.data(BODY)


async def cell(port: int, mode: str, recipients: int, *, seconds: float, messages: int) -> tuple[float, float]:
    """(messages per second, client CPU ms per message) over one connection."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60, start_tls=False)
    await smtp.connect()
    await smtp.ehlo()
    assert smtp.supports_extension("pipelining") == (mode == "pipelined")
    rcpts = [f"user{i}@bench.example" for i in range(recipients)]
    sent, cpu, start = 0, time.process_time(), time.monotonic()
    for _ in range(messages):
        if mode == "aiosmtplib":
            await old_transaction(smtp, rcpts)
        else:
            done = await transaction(smtp, "load@bench.example", rcpts, BODY, [f"SIZE={len(BODY)}"], rset=False,
                                     timeout=60)
            assert all(r.code == 250 for r in done.replies.values()) and len(done.replies) == recipients
        sent += 1
        if time.monotonic() - start > seconds:
            break
    elapsed, cpu = time.monotonic() - start, time.process_time() - cpu
    smtp.close()
    return sent / elapsed, cpu * 1000 / sent


def start_sink(delay_ms: float, pipelining: bool) -> tuple[subprocess.Popen[str], int]:
    command = [sys.executable, __file__, "--sink", str(delay_ms), "--offer-pipelining", str(int(pipelining))]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line and line[0] == "ready", line
    return proc, int(line[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delays", default="0,5,20", help="reply delays in ms, comma-separated")
    ap.add_argument("--recipients", default="1,10,50", help="recipients per message, comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0, help="at most this long per cell")
    ap.add_argument("--messages", type=int, default=2000, help="at most this many messages per cell")
    ap.add_argument("--sink", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--offer-pipelining", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sink is not None:
        asyncio.run(sink(args.sink, bool(args.offer_pipelining)))
        return
    modes = ["aiosmtplib", "sequential", "pipelined"]
    heads = " | ".join(f"{m} msg/s (CPU ms/msg)" for m in modes)
    print(f"| delay | recipients | {heads} | pipelined / aiosmtplib |")
    print("|---:|---:|" + "---:|" * (len(modes) + 1))
    for delay in (float(d) for d in args.delays.split(",")):
        sinks = {offer: start_sink(delay, offer) for offer in (False, True)}
        try:
            for n in (int(r) for r in args.recipients.split(",")):
                rates = {m: asyncio.run(cell(sinks[m == "pipelined"][1], m, n, seconds=args.seconds,
                                             messages=args.messages)) for m in modes}
                row = " | ".join(f"{rate:.1f} ({cpu:.2f})" for rate, cpu in rates.values())
                print(f"| {delay:g} ms | {n} | {row} | {rates['pipelined'][0] / rates['aiosmtplib'][0]:.2f}x |",
                      flush=True)
        finally:
            for proc, _ in sinks.values():
                proc.communicate("")


# endregion

if __name__ == "__main__":
    main()
