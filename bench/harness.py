"""What the benchmark starts and measures: a Mailyard site relaying to a sink through DNS MX,
and CPU time of process trees read from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import ctools

from mailyard.internet.dns import MX, A, DnsServer, Zone
from mailyard.org import Organization, load_org
from mailyard.site.redis_server import free_port
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until

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


def cpu_by_process(pids: list[int]) -> dict[str, float]:
    """CPU seconds per process of these trees, keyed by a short command line (for profiles)."""
    out: dict[str, float] = {}
    for root in pids:
        for p in descendants(root):
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:90]
            except OSError:
                continue
            out[f"{p} {cmd}"] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and all their descendants."""
    total = 0
    for root in pids:
        for p in descendants(root):
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError):
                continue
    return total / TICK


def bench_org(dns: DnsServer, sink_port: int, *, relay_port_binding: str = "0.0.0.0:2600") -> Organization:
    data = load_org(ROOT / "deploy" / "contoso.toml").model_dump(mode="json")
    data["transport"].update({"dns_servers": [dns.address], "sweep_interval": "1s"})
    for conn in data["send_connectors"]:
        conn["port"] = sink_port
    data["receive_connectors"].append({
        "name": "Relay", "bindings": [relay_port_binding], "remote_ip_ranges": ["127.0.0.1"],
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
    redis: RedisServer | None = None
    dns: DnsServer | None = None
    sink_proc: subprocess.Popen | None = None
    sink_port: int = 0
    cluster: Cluster | None = None
    arrivals: Path = field(default_factory=Path)
    csink: ctools.CSink | None = None

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
        if self.c_sink and not (self.tempfail or self.permfail):
            self.csink = ctools.CSink(SINK_IP, self.sink_port, self.work / "sink")
            self.sink_proc = self.csink.proc
            wait_until(lambda: _listening(SINK_IP, self.sink_port), timeout=10, message="smtp-sink listens")
            return
        self.arrivals = self.work / "arrivals.txt"
        self.sink_proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "sink.py"), "--host", SINK_IP, "--port", str(self.sink_port),
             "--out", str(self.arrivals), "--tempfail", str(self.tempfail), "--permfail", str(self.permfail)],
            stdout=subprocess.PIPE, text=True)
        assert self.sink_proc.stdout is not None and self.sink_proc.stdout.readline().strip() == "ready"

    def start(self) -> Site:
        self.work.mkdir(parents=True, exist_ok=True)
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

    def site_pids(self) -> list[int]:
        assert self.cluster and self.redis and self.redis.proc
        return [p.pid for p in self.cluster.procs.values()] + [self.redis.proc.pid]

    def sink_pid(self) -> int:
        assert self.sink_proc
        return self.sink_proc.pid

    def arrival_count(self) -> int:
        if self.csink:
            return self.csink.count()
        return len(self.read_arrivals())

    def read_arrivals(self) -> list[tuple[str, str, float]]:
        if self.csink:
            return self.csink.arrivals()
        out = []
        try:
            text = self.arrivals.read_text()
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3:
                out.append((parts[0], parts[1], float(parts[2])))
        return out

    def wait_arrivals(self, expected: int, timeout: float) -> list[tuple[str, str, float]]:
        deadline = time.monotonic() + timeout
        while self.arrival_count() < expected and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.read_arrivals()

    def reset_arrivals(self) -> None:
        if self.csink:
            self.csink.reset()
            return
        # The sink appends; a fresh measurement ignores what came before.
        self.arrivals.write_text("")

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


def _listening(host: str, port: int) -> bool:
    import socket

    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


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
