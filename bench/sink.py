"""A fast SMTP sink for the benchmark: accepts everything (or a share of 4xx, at random, and
5xx for the recipients the load named ``bounce*``), keeps
nothing but a line per arrival (the message's X-Bench-Id and the time), so the benchmark can
tell latency and whether each message arrived exactly once.

Run as its own process (like Postfix's smtp-sink): ``python bench/sink.py --host H --port P
--out FILE [--tempfail 0.05] [--permfail 0.02]``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import signal
import time

from aiosmtpd.smtp import SMTP, Envelope, Session

BENCH_ID = re.compile(rb"^X-Bench-Id: (\S+)", re.MULTILINE)


class Handler:
    def __init__(self, out, tempfail: float, permfail: float) -> None:  # type: ignore[no-untyped-def]
        self.out = out
        self.tempfail = tempfail
        self.permfail = permfail

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        if self.permfail and address.startswith("bounce"):  # the load chose these: it can count them
            return "550 5.1.1 User unknown"
        if random.random() < self.tempfail:
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        found = BENCH_ID.search(envelope.original_content or b"")
        ident = found.group(1).decode() if found else "?"
        now = time.time()
        for rcpt in envelope.rcpt_tos:
            self.out.write(f"{ident} {rcpt} {now:.6f}\n")
        return "250 2.0.0 OK"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tempfail", type=float, default=0.0)
    ap.add_argument("--permfail", type=float, default=0.0)
    args = ap.parse_args()
    with open(args.out, "a", buffering=1) as out:
        handler = Handler(out, args.tempfail, args.permfail)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="sink.bench", ident="bench sink", data_size_limit=None),
            args.host, args.port, reuse_address=True, backlog=1024)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("ready", flush=True)
        await stop.wait()
        server.close()


if __name__ == "__main__":
    asyncio.run(main())
