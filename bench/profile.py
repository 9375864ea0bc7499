"""Where the mailbox variants' CPU goes: one peak run of ``--variant mailbox`` or
``smtp-mailbox`` (as bench/run.py makes it, without Postfix) with py-spy sampling every
process of the site (``pip install py-spy``; root, or ptrace allowed).

    python bench/profile.py --variant mailbox --messages 2000 --sessions 20

Prints, per process (a hub with its receive and pool processes), its CPU milliseconds per
message and the functions where its samples are (of the thread holding the GIL, unless
``--wall``), by themselves and with what they call;
the raw stacks (py-spy's collapsed format, for a flame graph) go to bench/results/."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run
from harness import Site
from results import RESULTS, STAMP

PY_SPY = Path(sys.executable).with_name("py-spy")
RATE = 100  # samples per second


def top(raw: Path, count: int) -> list[str]:
    """The heaviest functions of a collapsed-stack file: their own share, and with callees."""
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    total = 0
    for entry in raw.read_text().splitlines():
        stack, _, n = entry.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        total += int(n)
        own[frames[-1]] += int(n)
        for frame in set(frames):
            under[frame] += int(n)
    if not total:
        return ["  (no samples)"]
    lines = [f"  {total} samples ({total / RATE:.1f} s of a thread running)", "  own:"]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(count)]
    lines.append("  with callees (below the framework's entry points):")
    skip = ("<module>", "_run_", "run (", "Runner.", "main (", "Thread._bootstrap", "invoke", "__call__", "serve")
    deep = [(f, n) for f, n in under.most_common(200) if not any(s in f for s in skip) and n < total]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in deep[:count]]
    return lines


def main() -> None:
    ap = run.parser()
    ap.add_argument("--top", type=int, default=15, help="functions listed per process")
    ap.add_argument("--wall", action="store_true",
                    help="sample every thread that is not idle (waits for fsync and sockets too); by default "
                         "only the thread holding the GIL, which is where Python spends CPU")
    args = ap.parse_args()
    args.load_choice, args.sink_choice = args.load, args.sink
    if args.variant not in ("mailbox", "smtp-mailbox"):
        ap.error("--variant mailbox or smtp-mailbox")
    run.prepare(args)
    inject = run.mailbox_inject if args.variant == "mailbox" else run.smtp_mailbox_inject
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mailyard-profile-") as tmp:
        site = Site(Path(tmp), hubs=args.hubs, fsync=args.fsync, concurrency=args.concurrency, mailboxes=True,
                    c_sink=args.sink == "smtp-sink")
        try:
            site.start()
            inject(args, site, "warmup", min(100, args.messages))
            assert site.cluster is not None
            spies = {}
            for name, proc in site.cluster.procs.items():
                out = RESULTS / f"{STAMP}-profile-{args.variant}-{name}.txt"
                spies[name] = (out, subprocess.Popen(
                    [str(PY_SPY), "record", "--nonblocking", "--subprocesses", "-r", str(RATE), "-f", "raw",
                     *([] if args.wall else ["--gil"]), "-o", str(out), "-p", str(proc.pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            result = inject(args, site, f"profiled {args.variant}", args.messages)
            for _, spy in spies.values():
                spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled, then exits
            for _, spy in spies.values():
                spy.wait(60)
        finally:
            site.stop()
    print(run.line(result))
    by = result.get("cpu_ms_per_message_by_process", {})
    for name, (out, _) in spies.items():
        print(f"\n{name}: {by.get(name, '?')} ms of CPU per message")
        print("\n".join(top(out, args.top)) if out.exists() else "  (py-spy wrote nothing)")
    print(f"\nredis: {by.get('redis', '?')} ms of CPU per message\nraw stacks in {RESULTS}/{STAMP}-profile-*")


if __name__ == "__main__":
    main()
