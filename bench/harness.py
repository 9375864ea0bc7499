"""What the benchmark starts and measures: a Mailyard site relaying to a sink through DNS MX,
and CPU time of process trees read from /proc."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ctools

from mailyard.cli.health import smtp_greeting
from mailyard.internet.dns import MX, A, DnsServer, Zone
from mailyard.org import Organization, load_org
from mailyard.site.redis_server import free_port
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_group import RedisGroup
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import Timeout, wait_until

ROOT = Path(__file__).resolve().parent.parent
SINK_IP = "127.0.0.3"
DOMAIN = "bench.example"
TICK = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and all their descendants, those that exited
    included: a process's own time (utime, stime) and what its children that exited and were
    waited for used (cutime, cstime). Postfix's daemons exit after max_use (100) clients and
    master reaps them: without the second pair their CPU would be missed."""
    total = 0
    for root in pids:
        for p in descendants(root):
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
            except (OSError, IndexError):
                continue
    return total / TICK


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (every CPU, anything but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


class Others:
    """How much CPU work not of this measurement (other engineers' on a shared machine) ran
    beside it: the machine's busy time minus what the measured processes used."""

    def __init__(self) -> None:
        self.busy0, self.t0 = machine_busy_seconds(), time.monotonic()

    def cores(self, measured_cpu: float) -> float:
        wall = time.monotonic() - self.t0
        return round(max(0.0, machine_busy_seconds() - self.busy0 - measured_cpu) / max(wall, 1e-9), 2)


def bench_org(dns: DnsServer, sink_port: int) -> Organization:
    data = load_org(ROOT / "deploy" / "contoso.toml").model_dump(mode="json")
    data["transport"].update({"dns_servers": [dns.address], "sweep_interval": "1s"})
    for conn in data["send_connectors"]:
        conn["port"] = sink_port
    data["receive_connectors"].append({
        "name": "Relay", "bindings": ["0.0.0.0:2600"], "remote_ip_ranges": ["127.0.0.1"],
        # Secured by IP, like an Exchange connector for a trusted relay: smtp-source cannot log on.
        "permission_groups": ["ExchangeServers"], "auth_mechanisms": ["ExternalAuthoritative"],
        "max_message_size": "200MB", "max_recipients_per_message": 5000,
        "max_inbound_connection_per_source": 5000,
    })
    # The backlog variant queues 100,000 messages on purpose: back pressure would refuse them.
    data["transport"].update({"pressure_backlog_normal": 1_000_000, "pressure_backlog_medium": 2_000_000,
                              "pressure_backlog_high": 4_000_000})
    return Organization.model_validate(data)


@dataclass
class Site:
    """Redis (AOF), a DNS server, the sink process and N hubs of one site."""

    work: Path
    hubs: int = 2
    fsync: str = "always"
    concurrency: int = 2
    mailboxes: bool = False
    tempfail: float = 0.0
    permfail: float = 0.0
    c_sink: bool = False  # Postfix's smtp-sink instead of bench/sink.py
    redis_replicas: int = 0  # >0: a primary, that many replicas and three Sentinels
    redis: RedisServer | RedisGroup | None = None
    dns: DnsServer | None = None
    sink_proc: subprocess.Popen | None = None
    sink_port: int = 0
    cluster: Cluster | None = None
    sink_log: ctools.CSink | ArrivalLog | None = None  # where the sink's arrivals are read

    def start_sink_only(self) -> Site:
        """Just the sink (the Postfix comparison relays to it)."""
        self.work.mkdir(parents=True, exist_ok=True)
        self._start_sink()
        return self

    def sink_down(self) -> None:
        """The next hop goes down: its port refuses connections."""
        assert self.sink_proc
        self.sink_proc.terminate()
        self.sink_proc.wait(10)

    def sink_up(self) -> None:
        """The next hop comes back, on the same address and port."""
        self._start_sink(self.sink_port)

    def _start_sink(self, port: int = 0) -> None:
        self.sink_port = port or free_port(SINK_IP)
        if self.c_sink:
            assert not (self.tempfail or self.permfail), "smtp-sink cannot refuse recipients: use the Python sink"
            csink = ctools.CSink(SINK_IP, self.sink_port, self.work / "sink")
            self.sink_log, self.sink_proc = csink, csink.proc
            wait_until(lambda: smtp_greeting(f"{SINK_IP}:{self.sink_port}", 1), timeout=10,
                       message="smtp-sink listens")
            return
        if not isinstance(self.sink_log, ArrivalLog):
            self.sink_log = ArrivalLog(self.work / "arrivals.txt")
        self.sink_proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "sink.py"), "--host", SINK_IP, "--port", str(self.sink_port),
             "--out", str(self.sink_log.path), "--tempfail", str(self.tempfail), "--permfail", str(self.permfail)],
            stdout=subprocess.PIPE, text=True)
        assert self.sink_proc.stdout is not None and self.sink_proc.stdout.readline().strip() == "ready"

    def start(self) -> Site:
        self.work.mkdir(parents=True, exist_ok=True)
        if self.redis_replicas:
            self.redis = RedisGroup(self.work / "redis", replicas=self.redis_replicas, fsync=self.fsync,
                                    databases=1).start()
        else:
            self.redis = RedisServer(self.work / "redis", fsync=self.fsync, databases=1).start()
        zone = Zone()
        zone.replace(DOMAIN, MX(10, f"mx.{DOMAIN}"))
        zone.replace(f"mx.{DOMAIN}", A(SINK_IP))
        self.dns = DnsServer(zone)
        self.dns.start()
        self._start_sink()
        self.cluster = Cluster(self.redis.url(0), self.work / "site", bench_org(self.dns, self.sink_port), cwd=ROOT)
        if self.mailboxes:
            self.cluster.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
        procs = [self.cluster.start_hub("Amsterdam", f"bench-{i}", wait=False, concurrency=self.concurrency)
                 for i in range(1, self.hubs + 1)]
        for proc in procs:
            self.cluster.wait_hub(proc)
            self.cluster.smtp(proc.name, "Relay")
        return self

    @property
    def relay_endpoints(self) -> list[tuple[str, int]]:
        assert self.cluster
        return [self.cluster.smtp(f"bench-{i}", "Relay") for i in range(1, self.hubs + 1)]

    def redis_pids(self) -> list[int]:
        assert self.redis
        if isinstance(self.redis, RedisGroup):
            return [p.pid for p in [*self.redis.nodes, *self.redis.sentinels] if p is not None]
        assert self.redis.proc
        return [self.redis.proc.pid]

    def site_pids(self) -> list[int]:
        assert self.cluster
        return [p.pid for p in self.cluster.procs.values()] + self.redis_pids()

    def sink_pid(self) -> int:
        assert self.sink_proc
        return self.sink_proc.pid

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds so far of each of the site's processes with its children (a hub's
        receive and pool processes are its children), and Redis's."""
        assert self.cluster
        out = {name: cpu_seconds([proc.pid]) for name, proc in self.cluster.procs.items()}
        out["redis"] = cpu_seconds(self.redis_pids())  # with replicas: every node and Sentinel
        return out

    def harness_pids(self) -> list[int]:
        """What runs for the measurement but is not the site: the sink."""
        return [self.sink_pid()]

    def internet_endpoints(self) -> list[tuple[str, int]]:
        """Every hub's ``Internet`` receive connector (anonymous, for the organization's own
        domains: a client from 127.0.0.2 gets it, 127.0.0.1 gets ``Default``)."""
        assert self.cluster
        return [self.cluster.smtp(f"bench-{i}", "Internet") for i in range(1, self.hubs + 1)]

    def inbox(self, server: str, address: str) -> Path:
        """The ``new/`` directory of a mailbox's Inbox on a mailbox server."""
        return self.work / "site" / "mailboxes" / server / address / "new"

    def settle(self, timeout: float = 120) -> None:
        """Wait until every delivery and redelivery is over (nothing in flight, no lease
        left, no retry due, no Outbox pickup unacknowledged, every Outbox empty), so that an
        exactly-once count sees the copies a redelivery would add."""
        from mailyard.testing.quiet import wait_quiet

        assert self.cluster
        outboxes = list((self.work / "site" / "mailboxes").glob("*/*/.Outbox"))

        def waiting() -> list[str]:
            return [f"{box.parent.name}'s Outbox holds {n}" for box in outboxes
                    if (n := sum(1 for sub in ("new", "cur") if (box / sub).is_dir()
                                 for _ in (box / sub).iterdir()))]

        wait_quiet(self.cluster.r, timeout=timeout, settle=1.0, also=waiting)

    def read_arrivals(self) -> list[tuple[str, str, float]]:
        assert self.sink_log
        return self.sink_log.arrivals()

    def wait_arrivals(self, expected: int, timeout: float) -> list[tuple[str, str, float]]:
        """The arrivals once ``expected`` are in, or whatever came by the deadline."""
        assert self.sink_log
        with contextlib.suppress(Timeout):
            wait_until(lambda: self.sink_log.count() >= expected, timeout=timeout, interval=0.1)
        return self.read_arrivals()

    def reset_arrivals(self) -> None:
        assert self.sink_log
        self.sink_log.reset()

    def redis_memory(self) -> int:
        assert self.cluster
        return int(self.cluster.r.info("memory")["used_memory"])

    def stop(self) -> None:
        if self.cluster:
            self.cluster.close()
        if self.sink_proc:
            self.sink_proc.terminate()
            self.sink_proc.wait(10)
        if self.dns:
            self.dns.stop()
        if self.redis:
            self.redis.stop()


class ArrivalLog:
    """bench/sink.py's arrivals file (a line "id recipient time" per recipient), read from
    where the last call stopped: polling it while a run goes on costs little."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._got: list[tuple[str, str, float]] = []

    def count(self) -> int:
        return len(self.arrivals())

    def arrivals(self) -> list[tuple[str, str, float]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return self._got
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line being written is read next time
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            parts = line.split()
            if len(parts) == 3:
                self._got.append((parts[0], parts[1], float(parts[2])))
        return self._got

    def reset(self) -> None:
        # The sink appends; a fresh measurement ignores what came before.
        self.path.write_text("")
        self._offset, self._got = 0, []


def quiet(threshold: float = 0.15, timeout: float = 60) -> None:
    """Wait until the machine is mostly idle, so one run does not eat into the next."""
    def idle() -> bool:
        a = Path("/proc/stat").read_text().split()[1:8]
        time.sleep(0.5)
        b = Path("/proc/stat").read_text().split()[1:8]
        da = [int(y) - int(x) for x, y in zip(a, b, strict=True)]
        busy = sum(da) - da[3]
        return sum(da) > 0 and busy / sum(da) < threshold
    try:
        wait_until(idle, timeout=timeout, interval=0.1)
    except AssertionError:
        pass
