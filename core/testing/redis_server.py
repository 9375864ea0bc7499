"""A real redis-server on a free loopback port, with AOF and a password (as every Redis
Mailyard starts), that tests can kill and restart. ``url()`` carries the password."""

from __future__ import annotations

import secrets
import signal
import subprocess
from pathlib import Path

from mailyard.site import redis_server


class RedisServer:
    def __init__(self, data_dir: Path, *, fsync: str = "always", databases: int = 256,
                 maxmemory: str | None = None, replica_of: RedisServer | None = None,
                 min_replicas: int = 0) -> None:
        """``replica_of``: start as that server's replica (its password, and ``masterauth``);
        ``min_replicas``: a primary that refuses writes with fewer good replicas (NOREPLICAS)."""
        self.data_dir = Path(data_dir)
        self.fsync = fsync
        self.databases = databases
        self.maxmemory = maxmemory
        self.replica_of = replica_of
        self.min_replicas = min_replicas
        self.port = redis_server.free_port()
        self.password: str = replica_of.password if replica_of else secrets.token_urlsafe(24)
        self.proc: subprocess.Popen | None = None
        self._next_db = 0

    def url(self, db: int = 0, *, password: bool = True) -> str:
        """The URL of database ``db``, with the password (``password=False``: without, as
        an intruder would try)."""
        auth = f":{self.password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        cmd = redis_server.command(self.data_dir, self.port, fsync=self.fsync, maxmemory=self.maxmemory,
                                   databases=self.databases, password=self.password,
                                   masterauth=self.replica_of is not None)
        cmd += ["--repl-diskless-sync-delay", "0"]  # a replica's first sync at once, not after 5 s
        if self.replica_of:
            cmd += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
        if self.min_replicas:
            cmd += ["--min-replicas-to-write", str(self.min_replicas), "--min-replicas-max-lag", "10"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     umask=redis_server.UMASK)
        redis_server.wait_ready(self.url(), self.proc)
        return self

    def new_db(self) -> str:
        """A database of its own for one test (the server is shared by the session)."""
        if self._next_db >= self.databases:
            raise RuntimeError("out of Redis databases; raise `databases`")
        db = self._next_db
        self._next_db += 1
        return self.url(db)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        """Start again on the same port, recovering from the AOF."""
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
