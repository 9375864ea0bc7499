"""Mailyard's benchmark: relay throughput and latency with durability on, beside Postfix.

    python bench/run.py                       # the default relay run (5 KB, 1 recipient, 20 sessions)
    python bench/run.py --sessions 50 --hubs 4 --size 10240
    python bench/run.py --variant backlog --messages 100000
    python bench/run.py --variant realistic   # a share of recipients get 4xx and 5xx
    python bench/run.py --matrix              # the set of variants the README reports

It starts everything it needs on loopback (Redis with AOF, a DNS server, an SMTP sink, the
hubs), injects the load over SMTP, and prints per run: accepted/s, delivered/s, latency
from 250 to arrival (p50, p95, p99, max), CPU seconds per message for the whole site,
Redis memory per queued message, and whether every message arrived exactly once. When
Postfix is installed (``--postfix auto``, the default; ``--install-postfix`` installs
Debian's package), the same load goes through a private Postfix instance to the same sink
and the ratio is printed. Results go to bench/results/ as JSON, Markdown and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ctools
from harness import DOMAIN, Others, Site, cpu_seconds, quiet
from load import Load
from maildir import MaildirArrivals
from results import write

from mailyard import keys


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarize(name: str, load: Load, arrivals: list[tuple[str, str, float]], recipients: int,
              load_wall: float, cpu_site: float, cpu_other: float) -> dict:
    accepted_times = sorted(load.accepted.values())
    first_arrival: dict[str, float] = {}
    counts: dict[tuple[str, str], int] = {}
    ndrs = [a for a in arrivals if a[1] == load.sender]  # NDRs for the bounced, sent back to the load
    # Only this run's messages: a deferred one from the warm-up may arrive during it.
    arrivals = [a for a in arrivals if a[1] != load.sender and a[0] in load.accepted]
    for ident, rcpt, at in arrivals:
        counts[(ident, rcpt)] = counts.get((ident, rcpt), 0) + 1
        first_arrival.setdefault(ident, at)
        first_arrival[ident] = min(first_arrival[ident], at)
    # An arrival's time is its file's mtime with smtp-sink (the kernel's clock tick, a few ms
    # coarse), so a next hop faster than that can seem to deliver before the 250: count it as 0.
    latencies = [max(0.0, first_arrival[i] - t) for i, t in load.accepted.items() if i in first_arrival]
    arrival_times = sorted(a for _, _, a in arrivals)
    n_acc = len(load.accepted)
    expected = (n_acc - len(load.bounced & load.accepted.keys())) * recipients
    duplicates = sum(c - 1 for c in counts.values() if c > 1)
    missing = expected - len(counts)
    accept_span = (accepted_times[-1] - accepted_times[0]) if len(accepted_times) > 1 else load_wall
    deliver_span = (arrival_times[-1] - arrival_times[0]) if len(arrival_times) > 1 else float("nan")
    return {
        "name": name,
        "messages": n_acc,
        "recipients_per_message": recipients,
        "accepted_per_s": round(n_acc / accept_span, 1) if accept_span else None,
        "delivered_per_s": round(len(arrivals) / recipients / deliver_span, 1) if deliver_span else None,
        "latency_p50_ms": round(1000 * percentile(latencies, 50), 1),
        "latency_p95_ms": round(1000 * percentile(latencies, 95), 1),
        "latency_p99_ms": round(1000 * percentile(latencies, 99), 1),
        "latency_max_ms": round(1000 * max(latencies), 1) if latencies else None,
        "cpu_ms_per_message_site": round(1000 * cpu_site / max(1, n_acc), 2),
        "cpu_ms_per_message_harness": round(1000 * cpu_other / max(1, n_acc), 2),
        "missing": missing,
        "duplicates": duplicates,
        "exactly_once": missing == 0 and duplicates == 0,
        "refused": load.refused,
        **({"bounced": len(load.bounced & load.accepted.keys()), "ndrs_at_sink": len(ndrs)} if load.bounced else {}),
    }


class Arrivals(Protocol):
    """Where inject reads arrivals: a Site's sink, or a MaildirArrivals watching Inboxes."""

    def reset_arrivals(self) -> None: ...
    def wait_arrivals(self, expected: int, timeout: float) -> list[tuple[str, str, float]]: ...
    def harness_pids(self) -> list[int]: ...


def inject(args: argparse.Namespace, site: Arrivals, endpoints: list[tuple[str, int]], pids: list[int], name: str,
           messages: int, *, rate: float = 0.0, c_tools: bool = False, arrive: bool = True,
           settle: Callable[[], None] | None = None) -> dict:
    """Send ``messages`` into ``endpoints`` and measure until they arrived (at the sink, or
    in the Inboxes).

    With ``c_tools`` the load is Postfix's ``smtp-source`` (accepted/s is its count over its
    wall time; it does not say when each 250 came); otherwise the Python load, which notes
    every 250 and so gives latencies. ``rate`` paces the Python load. ``settle`` waits until
    every redelivery is over: the exactly-once counts are taken after it (throughput,
    latency and CPU at the arrivals)."""
    recipients = args.rcpts or [f"user{i}@{DOMAIN}" for i in range(args.recipients)]
    site.reset_arrivals()
    quiet()
    cpu0_site, cpu0_sink = cpu_seconds(pids), cpu_seconds(site.harness_pids())
    others = Others()
    r0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    merged = Load("", 0, 0, 0, recipients)
    if c_tools:
        wall, failed = ctools.source(endpoints, messages, args.size, args.sessions, args.recipients,
                                     "load@bench.example", f"user0@{DOMAIN}" if args.recipients == 1 else f"u@{DOMAIN}")
        expected = (messages // len(endpoints)) * len(endpoints) * args.recipients
        merged.refused = failed
    else:
        per = messages // len(endpoints)
        loads = [Load(host, port, per, args.size, recipients, sessions=max(1, args.sessions // len(endpoints)),
                      rate=rate / len(endpoints), bounce_share=args.permfail, source=args.source)
                 for host, port in endpoints]

        async def go() -> float:
            # No spaces: the sink reads the id up to the first one. Unique per run: it makes
            # the Message-ID, and a mailbox server stores a Message-ID it has seen only once.
            tag = f"r{time.time_ns() // 1000:x}"
            walls = await asyncio.gather(*(ld.run(f"{tag}-{i}") for i, ld in enumerate(loads)))
            return max(walls)

        wall = asyncio.run(go())
        for ld in loads:
            merged.accepted.update(ld.accepted)
            merged.refused += ld.refused
            merged.bounced |= ld.bounced
        expected = (len(merged.accepted) - len(merged.bounced & merged.accepted.keys())) * len(recipients)
    if not arrive:  # the backlog's fill: the next hop is down
        return {"messages": expected // args.recipients, "wall": wall, "refused": merged.refused}
    # The refused recipients' NDRs go back to the load's domain, the sink: wait for them too.
    # A deferred recipient is retried a minute later, and may be deferred again: wait for a few.
    arrivals = site.wait_arrivals(expected + len(merged.bounced & merged.accepted.keys()),
                                  timeout=max(300 if args.tempfail else 120, messages / 20))
    cpu_site = cpu_seconds(pids) - cpu0_site
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_load = sum(b.ru_utime - a.ru_utime + b.ru_stime - a.ru_stime for a, b in ((r0, r1), (c0, c1)))
    cpu_other = cpu_load + cpu_seconds(site.harness_pids()) - cpu0_sink
    others_cores = others.cores(cpu_site + cpu_other)
    arrivals = counted_after(arrivals, settle, lambda: site.wait_arrivals(0, 0))
    if c_tools:  # every message smtp-source sent counts as accepted, at the moment it finished
        stamp = time.time()
        merged.accepted = {ident: stamp for ident, _, _ in arrivals}
        result = summarize(name, merged, arrivals, args.recipients, wall, cpu_site, cpu_other)
        result["messages"] = expected // args.recipients
        result["missing"] = expected - (len(arrivals) - result["duplicates"])
        result["exactly_once"] = result["missing"] == 0 and result["duplicates"] == 0
        result["accepted_per_s"] = round(expected / args.recipients / wall, 1)
        for key in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_max_ms"):
            result[key] = None
    else:
        result = summarize(name, merged, arrivals, args.recipients, wall, cpu_site, cpu_other)
    result["load"] = "smtp-source" if c_tools else ("python, paced" if rate else "python")
    result["other_work_cores"] = others_cores
    return result


def measure(args: argparse.Namespace, name: str, run: Callable[[int, float], dict]) -> dict:
    """Peak throughput, then latency at half of it (the target's condition): one result.
    ``run(messages, rate)`` sends and measures (rate 0: as fast as it goes)."""
    load_before = [round(x, 2) for x in os.getloadavg()]  # other work on the machine, as uptime says it
    peak = run(args.messages, 0.0)
    peak["loadavg_before"] = load_before
    rate = (peak["delivered_per_s"] or 0) / 2
    if rate and args.variant in ("relay", "mailbox", "smtp-mailbox"):
        count = int(min(4000, max(300, rate * 20), args.paced_max))
        paced = run(count, rate)
        peak["half_peak_rate"] = round(rate, 1)
        peak["paced_messages"] = paced["messages"]
        for key in ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_max_ms"):
            if peak[key] is not None:
                peak["saturated_" + key] = peak[key]
            peak[key] = paced[key]
        peak["paced_other_work_cores"] = paced.get("other_work_cores")
        peak["paced_exactly_once"] = paced["exactly_once"]
        peak["exactly_once"] = peak["exactly_once"] and paced["exactly_once"]
        peak["missing"] += paced["missing"]
        peak["duplicates"] += paced["duplicates"]
    print(line(peak), flush=True)
    return peak


def counted_after(arrivals: list[tuple[str, str, float]], settle: Callable[[], None] | None,
                  read: Callable[[], list[tuple[str, str, float]]]) -> list[tuple[str, str, float]]:
    """The arrivals once every redelivery is over (``settle``), for the exactly-once count;
    the first arrival of each message stays the one its latency is taken from."""
    if settle is None:
        return arrivals
    try:
        settle()
    except AssertionError as exc:  # still busy at the deadline: count what is there, and say so
        print(f"(not quiet before the count: {exc})", flush=True)
    return read()


def relay_run(args: argparse.Namespace, site: Site, name: str, messages: int, *, arrive: bool = True) -> dict:
    """The warm-up and the backlog fill: unmeasured."""
    return inject(args, site, site.relay_endpoints, site.site_pids(), name, messages, arrive=arrive,
                  c_tools=args.c_tools)


def line(r: dict) -> str:
    at = f" at {r['half_peak_rate']}/s" if "half_peak_rate" in r else ""
    return (f"{r['name']:<28} accepted {r['accepted_per_s']:>7}/s  delivered {r['delivered_per_s']:>7}/s  "
            f"p50 {r['latency_p50_ms']} ms  p95 {r['latency_p95_ms']} ms  p99 {r['latency_p99_ms']} ms  "
            f"max {r['latency_max_ms']} ms{at}  "
            f"CPU {r['cpu_ms_per_message_site']} ms/msg (harness {r['cpu_ms_per_message_harness']})  "
            f"other work {r.get('other_work_cores', '?')} cores  exactly once: {r['exactly_once']}"
            + (f" (missing {r['missing']}, duplicates {r['duplicates']})" if not r["exactly_once"] else ""))


def backlog_run(args: argparse.Namespace, site: Site) -> dict:
    """The next hop is down while the backlog builds, then comes back: drain rate, and how
    long the Queue Viewer's questions take against that backlog."""
    from mailyard.hub.queue_rows import message_rows, queue_rows

    r = site.cluster.r  # type: ignore[union-attr]
    queue = f"Amsterdam\\{DOMAIN}"
    site.sink_down()  # the MX host is down: connections are refused, the queue goes to Retry
    mem0 = site.redis_memory()
    fill = relay_run(args, site, "backlog-fill", args.messages, arrive=False)
    wait_count = 0
    for _ in range(600):
        wait_count = r.zcard(keys.queue_members(queue))
        if wait_count >= args.messages * 0.98:
            break
        time.sleep(0.2)
    mem = site.redis_memory() - mem0
    t = time.monotonic()
    queue_rows(r)
    list_s = time.monotonic() - t
    t = time.monotonic()
    message_rows(r, queues=[queue], limit=1000)
    messages_s = time.monotonic() - t
    # Redis's URL holds its password: in the environment, as the CLI reads it, not on the command line.
    env = {**os.environ, "MAILYARD_REDIS_URL": site.redis.url(0)}  # type: ignore[union-attr]
    cli = {}
    for name, command in (("queue_list", ["queue", "list"]), ("queue_messages", ["queue", "messages", queue]),
                          ("queue_messages_filtered", ["queue", "messages", queue, "--filter",
                                                       "FromAddress -like 'load@*'", "--limit", "100"]),
                          ("queue_shape", ["queue", "shape", "--by", "queue"]),
                          ("queue_shape_domain", ["queue", "shape", "--by", "domain"]),
                          ("queue_shape_sender", ["queue", "shape", "--by", "sender"])):
        t = time.monotonic()  # the command as an operator types it: Python's start-up included
        subprocess.run([sys.executable, "-m", "mailyard", *command, "--json"],
                       check=True, capture_output=True, env=env)
        cli[f"cli_{name}_seconds"] = round(time.monotonic() - t, 3)
    site.sink_up()  # the next hop is back; the operator retries the queue now
    site.reset_arrivals()
    start = time.time()
    subprocess.run([sys.executable, "-m", "mailyard", "queue", "retry", queue],
                   check=True, capture_output=True, env=env)
    arrivals = site.wait_arrivals(wait_count, timeout=max(300, args.messages / 50))
    drain_s = (max(a for _, _, a in arrivals) - start) if arrivals else float("nan")
    idents = {ident for ident, _, _ in arrivals}
    out = {
        "name": f"backlog {args.messages}",
        "queued": wait_count,
        "fill_accepted_per_s": round(fill["messages"] / fill["wall"], 1),
        "redis_bytes_per_queued_message": round(mem / max(1, wait_count)),
        "message_size": args.size,
        "drain_per_s": round(len(arrivals) / drain_s, 1) if arrivals else None,
        "queue_list_seconds": round(list_s, 3),
        "queue_messages_seconds": round(messages_s, 3),
        **cli,
        "arrived": len(arrivals),
        "exactly_once": len(idents) == len(arrivals) == fill["messages"],
    }
    print(out, flush=True)
    return out


MAILBOX_RCPT = "carol@contoso.com"  # on MBX-AMS-02; in Postfix's Maildirs, the same address


def mailbox_inject(args: argparse.Namespace, site: Site, name: str, messages: int, rate: float = 0.0) -> dict:
    """The mailbox-to-mailbox path: clients "click Send" (the mailbox API's Outbox) at
    alice@contoso.com on MBX-AMS-01, for carol@contoso.com on MBX-AMS-02; arrival is the
    rename of the Maildir file into carol's Inbox (``new/``), the accepted time the 202.

    Over HTTPS, as every client: the server's certificate is checked against the
    organization's CA (and its identity as the TLS server name), and each client logs on
    with HTTP Basic as the site's operator (SendAs on every mailbox); one connection per
    session, kept open, so the TLS handshake and the logon's scrypt are not what is measured.
    ``rate`` paces the sends (message n no earlier than n / rate after the first)."""
    import httpx

    from mailyard import pki, registry

    assert site.cluster is not None
    base = registry.server_url(site.cluster.r, "MBX-AMS-01") + "/mailboxes/alice@contoso.com/outbox"
    tls = pki.trust_context(site.cluster.pki.cert_path)
    server_name = pki.sni(pki.Identity.mailbox("MBX-AMS-01"))
    logon = httpx.BasicAuth(*site.cluster.operator)
    watch = MaildirArrivals({site.inbox("MBX-AMS-02", MAILBOX_RCPT): MAILBOX_RCPT})
    accepted: dict[str, float] = {}
    refused = 0
    filler = "x" * max(0, args.size - 300)
    tag = f"m{time.time_ns() // 1000:x}"  # unique per run: it makes the Message-ID
    started = 0

    async def client(queue: asyncio.Queue[int], start: float) -> None:
        nonlocal refused, started
        async with httpx.AsyncClient(timeout=60, verify=tls, auth=logon) as http:
            while not queue.empty():
                batch = [queue.get_nowait() for _ in range(min(args.send_batch, queue.qsize()))]
                if rate:
                    started += len(batch)
                    await asyncio.sleep(max(0.0, start + (started - len(batch)) / rate - time.monotonic()))
                waiting = {f"{tag}-{n}": {"to": [MAILBOX_RCPT], "subject": f"bench {tag}-{n}",
                                          "body": f"X {tag}-{n}\n{filler}", "message_id": f"<{tag}-{n}@bench.example>"}
                           for n in batch}
                for _ in range(5):  # a 503 (not durable yet) or a lost answer: the same send again
                    idents = list(waiting)
                    try:
                        if args.send_batch == 1:
                            response = await http.post(base, json=waiting[idents[0]], extensions=server_name)
                            statuses = [response.status_code]
                        else:  # the batch Send: a result per message
                            response = await http.post(base + "/batch", json={"messages": list(waiting.values())},
                                                       extensions=server_name)
                            statuses = ([r["status"] for r in response.json()["results"]]
                                        if response.status_code == 200 else [response.status_code] * len(idents))
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
                        continue
                    for ident, status in zip(idents, statuses, strict=True):
                        if status == 202:
                            accepted[ident] = time.time()
                            del waiting[ident]
                        elif status in (400, 401, 403, 413, 415, 421):  # every other send would fail the same way
                            raise RuntimeError(f"the mailbox API refused the benchmark's send: {status} "
                                               f"{response.text}")
                    if not waiting:
                        break
                    await asyncio.sleep(0.05)
                else:
                    refused += len(waiting)

    async def go() -> float:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(messages):
            queue.put_nowait(n)
        start = time.monotonic()
        await asyncio.gather(*(client(queue, start) for _ in range(args.sessions)))
        return time.monotonic() - start

    watch.reset()
    quiet()
    pids = site.site_pids()
    cpu0, by0 = cpu_seconds(pids), site.cpu_by_process()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    others = Others()
    wall = asyncio.run(go())
    arrivals = watch.wait_arrivals(len(accepted), timeout=max(120, messages / 20))
    cpu, by1 = cpu_seconds(pids) - cpu0, site.cpu_by_process()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_load = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    others_cores = others.cores(cpu + cpu_load)
    arrivals = counted_after(arrivals, site.settle, watch.arrivals)
    load = Load("", 0, 0, 0, [MAILBOX_RCPT])
    load.accepted, load.refused = accepted, refused
    result = summarize(name, load, arrivals, 1, wall, cpu, cpu_load)
    result["load"] = ("python, mailbox API" + (f", {args.send_batch} per request" if args.send_batch > 1 else "")
                      + (", paced" if rate else ""))
    result["cpu_ms_per_message_by_process"] = per_message(by0, by1, len(accepted))
    result["other_work_cores"] = others_cores
    return result


def per_message(before: dict[str, float], after: dict[str, float], messages: int) -> dict[str, float]:
    """CPU milliseconds per message of each process (with its children) between two readings."""
    return {name: round(1000 * (after[name] - before.get(name, 0.0)) / max(1, messages), 2) for name in after}


def smtp_mailbox_inject(args: argparse.Namespace, site: Site, name: str, messages: int, rate: float = 0.0) -> dict:
    """SMTP in to a mailbox: the Python load, from 127.0.0.2, into every hub's ``Internet``
    receive connector, for carol@contoso.com; arrival in her Inbox on MBX-AMS-02."""
    watch = MaildirArrivals({site.inbox("MBX-AMS-02", MAILBOX_RCPT): MAILBOX_RCPT})
    by0 = site.cpu_by_process()
    result = inject(args, watch, site.internet_endpoints(), site.site_pids(), name, messages, rate=rate,
                    settle=site.settle)
    # (read after the settle: a second or so of idle heartbeats and sweeps more than the total)
    result["cpu_ms_per_message_by_process"] = per_message(by0, site.cpu_by_process(), result["messages"])
    return result


def run_mailyard(args: argparse.Namespace, label: str) -> dict:
    mailboxes = args.variant in ("mailbox", "smtp-mailbox")
    with tempfile.TemporaryDirectory(prefix="mailyard-bench-") as tmp:
        site = Site(Path(tmp), hubs=args.hubs, fsync=args.fsync, concurrency=args.concurrency,
                    tempfail=args.tempfail, permfail=args.permfail, mailboxes=mailboxes,
                    c_sink=args.sink == "smtp-sink", redis_replicas=args.redis_replicas)
        try:
            site.start()
            if mailboxes:
                run = mailbox_inject if args.variant == "mailbox" else smtp_mailbox_inject
                run(args, site, "warmup", min(100, args.messages))  # unmeasured: the first mail of each process
                return measure(args, label, lambda n, rate: run(args, site, label, n, rate))
            relay_run(args, site, "warmup", min(300, args.messages))
            if args.variant == "backlog":
                return backlog_run(args, site)
            result = measure(args, label, lambda n, rate: inject(
                args, site, site.relay_endpoints, site.site_pids(), label, n, rate=rate,
                c_tools=args.c_tools and not rate))
            result["redis_used_memory_bytes"] = site.redis_memory()
            return result
        finally:
            site.stop()


def run_postfix(args: argparse.Namespace) -> dict | None:
    """The same load through a private Postfix: relayed to the same kind of sink (the relay
    variants), or over SMTP into a Maildir through ``virtual(8)`` (the mailbox variants)."""
    from postfix import Postfix

    if not shutil.which("postfix"):
        print("Postfix is not installed: Mailyard's figures alone (--install-postfix adds Debian's package)")
        return None
    with tempfile.TemporaryDirectory(prefix="postfix-bench-") as tmp:
        pf = Postfix(Path(tmp) / "pf")
        endpoint = [("127.0.0.1", pf.port)]
        if args.variant in ("mailbox", "smtp-mailbox"):
            try:
                pf.start(maildirs=(MAILBOX_RCPT,))
                watch = MaildirArrivals({pf.inbox(MAILBOX_RCPT): MAILBOX_RCPT})
                pf_args = argparse.Namespace(**{**vars(args), "rcpts": [MAILBOX_RCPT], "source": "127.0.0.2"})

                def settle() -> None:  # nothing left in Postfix's queue, for a second
                    since = time.monotonic()
                    for _ in range(1200):
                        if not pf.queue_empty():
                            since = time.monotonic()
                        elif time.monotonic() - since >= 1.0:
                            return
                        time.sleep(0.1)
                    raise AssertionError("Postfix's queue is not empty")

                def run(n: int, rate: float) -> dict:
                    return inject(pf_args, watch, endpoint, [pf.master_pid], "postfix", n, rate=rate, settle=settle)

                run(min(100, args.messages), 0.0)  # warm-up
                return measure(pf_args, "postfix", run)
            finally:
                pf.stop()
        site = Site(Path(tmp) / "m", hubs=1, c_sink=args.sink == "smtp-sink")
        try:
            site.start_sink_only()
            pf.start(relay_to=("127.0.0.3", site.sink_port))
            inject(args, site, endpoint, [pf.master_pid], "warmup", min(300, args.messages))
            return measure(args, "postfix", lambda n, rate: inject(
                args, site, endpoint, [pf.master_pid], "postfix", n, rate=rate, c_tools=args.c_tools and not rate))
        finally:
            pf.stop()
            site.stop()


# What the README reports: each entry overrides the command line's defaults.
MATRIX: list[dict] = [
    {"sessions": 20}, {"sessions": 50}, {"fsync": "everysec"},
    {"hubs": 1, "postfix": "no"}, {"hubs": 4, "postfix": "no"},
    {"size": 1024}, {"size": 10240}, {"size": 102400, "messages": 2000},
    {"recipients": 5, "messages": 2000},
    {"variant": "realistic"}, {"variant": "mailbox", "messages": 1000, "sessions": 10},
    {"variant": "smtp-mailbox", "messages": 1000, "sessions": 10},
    {"variant": "backlog", "messages": 100_000},
]


def prepare(args: argparse.Namespace) -> None:
    """What the variant implies: the load and sink, the recipients, the load's address."""
    args.tempfail = args.permfail = 0.0
    if args.variant == "realistic":
        args.tempfail, args.permfail = 0.05, 0.02
    args.load = args.load_choice or ("smtp-source" if ctools.available() else "python")
    args.sink = args.sink_choice or ("smtp-sink" if ctools.available() else "python")
    args.rcpts, args.source = [], "127.0.0.1"
    if args.variant == "smtp-mailbox":  # the Internet connector is the one for 127.0.0.2
        args.rcpts, args.source = [MAILBOX_RCPT], "127.0.0.2"
    if args.variant in ("realistic", "mailbox", "smtp-mailbox"):
        args.load = "python"
    if args.variant == "realistic":  # smtp-sink cannot refuse a share of recipients
        args.sink = "python"
    if args.sink == "python":  # smtp-source's messages carry no X-Bench-Id for the Python sink
        args.load = "python"
    args.c_tools = args.load == "smtp-source"


def one(args: argparse.Namespace) -> list[dict]:
    """One run of Mailyard, and of Postfix beside it when there is one and it applies."""
    prepare(args)
    print(f"== {args.variant}: {args.size} bytes x{args.recipients}, {args.sessions} sessions, {args.hubs} hubs, "
          f"fsync {args.fsync}; load {args.load}, sink {args.sink}", flush=True)
    label = f"mailyard {args.size // 1024}KB x{args.recipients} s{args.sessions} h{args.hubs} {args.fsync}" + (
        f" r{args.redis_replicas}" if args.redis_replicas else "")
    if args.variant in ("mailbox", "smtp-mailbox"):
        label = f"{args.variant} {args.size // 1024}KB s{args.sessions} h{args.hubs}" + (
            f" b{args.send_batch}" if args.send_batch > 1 else "")
        label += f" r{args.redis_replicas}" if args.redis_replicas else ""
    results = [run_mailyard(args, label)]
    if args.postfix == "auto" and args.variant in ("relay", "mailbox", "smtp-mailbox"):
        pf = run_postfix(args)
        if pf:
            pf["name"] = f"postfix {args.size // 1024}KB x{args.recipients} s{args.sessions}"
            if args.variant != "relay":
                pf["name"] = f"postfix SMTP to Maildir {args.size // 1024}KB s{args.sessions}"
            results.append(pf)
            mine = results[0]
            mine["postfix_ratio"] = {
                "accepted": round(mine["accepted_per_s"] / pf["accepted_per_s"], 2),
                "delivered": round(mine["delivered_per_s"] / pf["delivered_per_s"], 2),
                "cpu_per_message": round(mine["cpu_ms_per_message_site"] / pf["cpu_ms_per_message_site"], 2),
            }
            print(f"Mailyard/Postfix: {mine['postfix_ratio']}", flush=True)
    return results


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--size", type=int, default=5120, help="bytes per message")
    ap.add_argument("--recipients", type=int, default=1)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--send-batch", type=int, default=1, metavar="N",
                    help="mailbox variant: messages per request (N > 1: the batch Send, POST .../outbox/batch)")
    ap.add_argument("--hubs", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=2, help="worker processes per hub")
    ap.add_argument("--fsync", choices=["always", "everysec"], default="always")
    ap.add_argument("--redis-replicas", type=int, default=0, metavar="N",
                    help="Redis replicated under Sentinel: a primary, N replicas, three Sentinels (durability replica)")
    ap.add_argument("--variant", choices=["relay", "mailbox", "smtp-mailbox", "backlog", "realistic"], default="relay")
    ap.add_argument("--paced-max", type=int, default=4000, metavar="N",
                    help="at most N messages in the run at half the peak rate")
    ap.add_argument("--postfix", choices=["auto", "no"], default="auto")
    ap.add_argument("--install-postfix", action="store_true")
    ap.add_argument("--load", choices=["smtp-source", "python"], default=None,
                    help="the load generator (default: Postfix's smtp-source when installed)")
    ap.add_argument("--sink", choices=["smtp-sink", "python"], default=None,
                    help="the sink (default: Postfix's smtp-sink when installed; --variant realistic uses python)")
    ap.add_argument("--matrix", action="store_true", help="every variant the README reports, one after another")
    ap.add_argument("--matrix-from", type=int, default=0, metavar="K", help="start the matrix at its K-th run (from 0)")
    return ap


def main() -> None:
    args = parser().parse_args()
    args.load_choice, args.sink_choice = args.load, args.sink
    if args.install_postfix and not shutil.which("postfix"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "postfix"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not args.matrix:
        write(one(args), args.variant)
        return
    results = []
    defaults = vars(args).copy()
    for overrides in MATRIX[args.matrix_from:]:
        run_args = argparse.Namespace(**{**defaults, **overrides})
        results += one(run_args)
        write(results, "matrix")  # after each run, so an interrupted matrix keeps what it measured


if __name__ == "__main__":
    main()
