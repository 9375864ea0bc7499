"""A real Edge Transport server for tests: ``mailyard edge run`` on its own Redis server and
data directory, on free loopback ports, started without anything of the organization's in
its environment (it must never reach the organization's Redis)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis

from mailyard import keys, redisconn
from mailyard.site.ports import free_port
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until


class EdgeNode:
    def __init__(self, data_dir: Path, name: str = "EDGE-01", *, host: str = "127.0.0.1",
                 cwd: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.name = name
        self.host = host
        self.cwd = cwd
        self.redis = RedisServer(self.data_dir / "redis", databases=1).start()
        self.smtp_port = free_port(host)
        self.sync_port = free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.data_dir / "edge.log"

    @property
    def r(self) -> redis.Redis:
        return redisconn.connect(self.redis.url())

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILYARD_")}
        env["PYTHONUNBUFFERED"] = "1"
        env["MAILYARD_EDGE_REDIS_URL"] = self.redis.url()
        return env

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "mailyard", "edge", *args, "--data-dir", str(self.data_dir)],
                              capture_output=True, text=True, env=self.env(), cwd=self.cwd, timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"mailyard edge {' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done

    def subscribe(self, file: Path, valid: str = "24h") -> Path:
        self.cli("subscribe", "--name", self.name, "--smtp", f"{self.host}:{self.smtp_port}",
                 "--sync", f"{self.host}:{self.sync_port}", "--file", str(file), "--valid", valid)
        return file

    def start(self) -> EdgeNode:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log.stat().st_size if self.log.exists() else 0  # (this start's lines, not an earlier one's)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailyard", "edge", "run", "--data-dir", str(self.data_dir)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env(), cwd=self.cwd,
                start_new_session=True)
        wait_until(lambda: b"EdgeSync on https://" in self.log.read_bytes()[offset:] or not self.alive, timeout=60,
                   message=lambda: f"the Edge did not start: {self.tail()}")
        assert self.alive, f"the Edge exited: {self.tail()}"
        return self

    def wait_smtp(self, timeout: float = 90) -> None:
        """Until the Edge's receive connector accepts connections (its transport started)."""
        import socket

        def accepts() -> bool:
            assert self.alive, f"the Edge exited: {self.tail()}"
            try:
                with socket.create_connection((self.host, self.smtp_port), timeout=5) as sock:
                    return sock.recv(3) == b"220"  # (a greeting: the listener of this start, working)
            except OSError:
                return False
        wait_until(accepts, timeout=timeout, message=lambda: f"the Edge's SMTP does not answer: {self.tail()}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("status", "--json").stdout))

    def state(self) -> dict[str, str]:
        return redisconn.text_map(self.r.hgetall(keys.EDGE_STATE))

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return " (no log)"

    def pids(self) -> list[int]:
        """The Edge's processes: its own and every descendant (its transport, the workers)."""
        if self.proc is None:
            return []
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as fh:
                        todo += [int(c) for c in fh.read().split()]
            except OSError:
                continue
        return out

    def kill(self, *, alone: bool = False) -> None:
        """SIGKILL the Edge and every process of it (its transport, its workers, rspamd), or
        with ``alone`` only ``edge run``, whose processes must then end by themselves."""
        assert self.proc is not None
        pids = self.pids()
        for pid in pids[:1] if alone else pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        # (the others are not this process's children: wait until they are gone, or reaped)
        wait_until(lambda: all(not os.path.exists(f"/proc/{p}") or _zombie(p) for p in pids), timeout=60,
                   message=lambda: "the Edge's processes outlived it: " + ", ".join(
                       _name(p) for p in pids if os.path.exists(f"/proc/{p}") and not _zombie(p)))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # (it stops its transport itself)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL) if self.proc else None
        except (ProcessLookupError, PermissionError):
            pass
        self.redis.stop()


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            command = fh.read().replace(b"\0", b" ").decode(errors="replace")
        return f"{pid} {command[:80]}"
    except OSError:
        return str(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def remote_ports(pids: list[int]) -> set[int]:
    """The remote TCP ports of every socket the processes ``pids`` hold (from /proc)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[9] in inodes:
                ports.add(int(fields[2].rpartition(":")[2], 16))
    return ports
