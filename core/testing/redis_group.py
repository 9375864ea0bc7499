"""A real replicated Redis under three real Sentinels, on free loopback ports, that tests can
fail over: kill the primary (with or without its data), bring it back, kill a replica, or cut
one node off by a partition (``behind_proxy``). ``url()`` is the group's ``redis+sentinel://``
URL, with the password."""

from __future__ import annotations

import dataclasses
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from mailyard import redisconn
from mailyard.site import redis_group, redis_server
from mailyard.site.redis_group import NO_RETRY, Layout, Wait
from mailyard.testing.proxy import Proxy


class RedisGroup:
    def __init__(self, root: Path, *, replicas: int = 1, fsync: str = "always", databases: int = 64,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 5000,
                 behind_proxy: int | None = None) -> None:
        """``behind_proxy``: node ``i`` has a loopback ``Proxy`` (``self.proxy``) for its address in
        the group: the Sentinels monitor it, the replicas replicate from it and it announces
        itself as a replica (``replica-announce-port``) through the proxy, so that a test can cut
        it off by a partition (``proxy.set_mode("blackhole")``). ``direct_url(i)`` is its own
        port, as a client on its side of the partition has it. (Only what reaches node ``i`` is
        proxied: while it is a replica, its own link to the primary is not cut.)"""
        ports = [redis_server.free_port() for _ in range(1 + replicas + redis_group.SENTINELS)]
        # _own: where each node listens; layout: where the group (Sentinels, replicas) reaches it.
        self._own = Layout(Path(root), ports[:1 + replicas], ports[1 + replicas:],
                           down_after_ms=down_after_ms, failover_timeout_ms=failover_timeout_ms)
        self.layout = self._own
        self.fsync, self.databases = fsync, databases
        self.password = secrets.token_urlsafe(24)
        self.behind_proxy = behind_proxy
        self.proxy: Proxy | None = None
        if behind_proxy is not None:
            self.proxy = Proxy(self._own.host, self._own.node_ports[behind_proxy], host=self._own.host,
                               port=redis_server.free_port(), password=self.password)
            seen = list(self._own.node_ports)
            seen[behind_proxy] = self.proxy.port
            self.layout = dataclasses.replace(self._own, node_ports=seen)
        self.nodes: list[subprocess.Popen | None] = [None] * len(self.layout.node_ports)
        self.sentinels: list[subprocess.Popen | None] = [None] * len(self.layout.sentinel_ports)
        self._next_db = 0

    def url(self, db: int = 0) -> str:
        return self.layout.url(self.password, db)

    def node_url(self, i: int, db: int = 0) -> str:
        """Node ``i`` at its address in the group (through the proxy for the node behind it)."""
        return self.layout.node_url(i, self.password).rsplit("/", 1)[0] + f"/{db}"

    def direct_url(self, i: int, db: int = 0) -> str:
        """Node ``i`` at its own port (never through the proxy)."""
        return self._own.node_url(i, self.password).rsplit("/", 1)[0] + f"/{db}"

    def new_db(self) -> str:
        if self._next_db >= self.databases:
            raise RuntimeError("out of Redis databases; raise `databases`")
        self._next_db += 1
        return self.url(self._next_db - 1)

    # region: starting and stopping

    def start(self) -> RedisGroup:
        if self.proxy is not None:
            self.proxy.start()
        for i in range(len(self.nodes)):
            self.start_node(i)
        for j in range(len(self.sentinels)):
            self.start_sentinel(j)
        self.wait_settled()
        return self

    def start_node(self, i: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while isinstance(role := redis_group.start_role(self.layout, i, self.password), Wait):
            if time.monotonic() > deadline:
                raise RuntimeError(role.reason)
            time.sleep(0.1)
        cmd = redis_group.node_command(self._own, i, role, password=self.password, fsync=self.fsync,
                                       databases=self.databases)
        if self.proxy is not None and i == self.behind_proxy:
            cmd += ["--replica-announce-port", str(self.proxy.port)]
        self.nodes[i] = proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                umask=redis_server.UMASK)
        redis_server.wait_ready(self.direct_url(i), proc)

    def start_sentinel(self, j: int) -> None:
        cmd = redis_group.sentinel_command(self.layout, j, password=self.password)
        self.sentinels[j] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             umask=redis_server.UMASK)

    def kill_node(self, i: int, *, lose_data: bool = False) -> None:
        """SIGKILL node ``i``; ``lose_data``: and delete its data directory (its machine is lost)."""
        _kill(self.nodes[i])
        self.nodes[i] = None
        if lose_data:
            shutil.rmtree(self.layout.node_dir(i), ignore_errors=True)

    def kill_sentinel(self, j: int) -> None:
        _kill(self.sentinels[j])
        self.sentinels[j] = None

    def stop(self) -> None:
        for proc in [*self.sentinels, *self.nodes]:
            _kill(proc)
        if self.proxy is not None:
            self.proxy.stop()

    # endregion

    # region: what the group looks like

    def primary(self) -> int | None:
        """The node the Sentinels name primary (None: none answers)."""
        found = redis_group.ask_sentinels(self.layout, self.password)
        return None if found is None else self.layout.node_of(*found)

    def role(self, i: int) -> str:
        """``master``, ``slave`` or "" (not answering), as node ``i`` itself says."""
        return redis_group.replication(self.direct_url(i)).get("role", "")

    def wait_settled(self, timeout: float = 60.0) -> int:
        """Wait until the Sentinels agree on a running primary that every running replica follows
        and that has every running replica connected; return its index."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            primary = self.primary()
            running = [i for i, p in enumerate(self.nodes) if p is not None and p.poll() is None]
            if primary is not None and primary in running and self.role(primary) == "master":
                info = redis_group.replication(self.direct_url(primary))
                replicas = [i for i in running if i != primary]
                followers = [i for i in replicas if self._follows(i, primary)]
                if len(followers) == len(replicas) and int(info.get("connected_slaves", 0)) >= len(replicas) \
                        and self._sentinels_agree(primary):
                    return primary
                last = f"primary {primary}, replicas {replicas}, following {followers}, info {info}"
            else:
                last = f"Sentinels name {primary}; running {running}"
            time.sleep(0.1)
        raise AssertionError(f"the Redis group did not settle within {timeout:.0f}s: {last}")

    def _follows(self, i: int, primary: int) -> bool:
        info = redis_group.replication(self.direct_url(i))
        return (info.get("role") == "slave" and int(info.get("master_port", 0)) == self.layout.node_ports[primary]
                and info.get("master_link_status") == "up")

    def _sentinels_agree(self, primary: int) -> bool:
        port = self.layout.node_ports[primary]
        for j, proc in enumerate(self.sentinels):
            if proc is None or proc.poll() is not None:
                continue
            client = redis.Redis(host=self.layout.host, port=self.layout.sentinel_ports[j], password=self.password,
                                 socket_timeout=1, socket_connect_timeout=1, retry=NO_RETRY)
            try:
                reply = client.execute_command("SENTINEL", "get-master-addr-by-name", self.layout.service)
            except redis.RedisError:
                return False
            finally:
                client.close()
            if not reply or int(reply[1]) != port:
                return False
        return True

    def wait_failover(self, old: int, timeout: float = 60.0) -> int:
        """Wait until the Sentinels name a primary other than ``old``; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.primary()
            if now is not None and now != old and self.role(now) == "master":
                return now
            time.sleep(0.1)
        raise AssertionError(f"no failover away from node {old} within {timeout:.0f}s")

    # endregion

    def client(self, db: int = 0) -> redis.Redis:
        return redisconn.connect(self.url(db))


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
