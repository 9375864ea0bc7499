"""The hub's receive process: listens on every binding of its site's receive connectors.

It runs beside the hub's Celery worker (which starts and restarts it), in its own process
because aiosmtpd's protocol code needs a core of its own under load. Listeners follow the
organization: a connector added, removed or rebound with ``mailyard org apply`` opens or
closes its listener within a second. Where the hub runs, a binding of the organization
file (``0.0.0.0:25``) may be mapped to another address (``127.0.0.1:2525``): the local
site gives each hub its own ports that way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
from pathlib import Path

from mailyard import keys, nodes, redisconn
from mailyard.broker import TASK_DRAIN, make_app, push_kicks_with
from mailyard.directory import Directory
from mailyard.hub import replies
from mailyard.hub.pressure import Level
from mailyard.hub.receive_protocol import Connection, ReceiveContext, Receiver
from mailyard.orgstore import AsyncOrgWatcher
from mailyard.tls import self_signed, server_context
from mailyard.txn import Kick

log = logging.getLogger("mailyard.hub.receive")


def parse_binds(values: list[str]) -> dict[str, str]:
    """``["0.0.0.0:25=127.0.0.1:2525"]`` -> {"0.0.0.0:25": "127.0.0.1:2525"}."""
    out = {}
    for value in values:
        configured, sep, actual = value.partition("=")
        if not sep or ":" not in actual:
            raise ValueError(f"--bind {value!r}: write CONFIGURED=HOST:PORT, e.g. 0.0.0.0:25=127.0.0.1:2525")
        out[configured.strip()] = actual.strip()
    return out


def advertised(actual: str) -> str:
    """The address other hubs should use: a listener on 0.0.0.0 or :: is reached by this host's
    name (in docker compose, the container's, which every network resolves); dialing 0.0.0.0
    would reach the caller itself."""
    host, port = _split(actual)
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = not host
    return f"{socket.gethostname()}:{port}" if unspecified else actual


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class ReceiveServer:
    def __init__(self, *, hub: str, site: str, redis_url: str, data_dir: Path,
                 binds: dict[str, str] | None = None) -> None:
        self.hub = hub
        self.site = site
        self.redis_url = redis_url
        self.data_dir = data_dir
        self.binds = binds or {}
        self.servers: dict[str, asyncio.Server] = {}  # actual address -> listener
        self.failed: set[str] = set()
        self.level = Level.NORMAL

    def _kick(self, kicks: list[Kick]) -> None:
        for k in kicks:
            try:
                self.app.send_task(TASK_DRAIN, args=[k.queue], queue=k.route)
            except Exception as exc:  # the sweeper re-sends what never arrived
                log.warning("could not send the drain task for %s: %s", k.queue, exc)

    async def start(self) -> None:
        self.r = redisconn.connect_async(self.redis_url)
        self.sync_r = redisconn.connect(self.redis_url)
        self.app = make_app(self.redis_url)
        push_kicks_with(self.app)
        self.watcher = AsyncOrgWatcher(self.r)
        await self.watcher.refresh()
        org = self.watcher.directory.org
        fqdn = self.hub if "." in self.hub else f"{self.hub}.{org.accepted_domains[0]}"
        tls_dir = self.data_dir / "tls"
        cert, key = tls_dir / f"{self.hub}.crt", tls_dir / f"{self.hub}.key"
        self_signed(cert, key, fqdn)
        self.ctx = ReceiveContext(
            hub=self.hub, site=self.site, fqdn=fqdn, r=self.r,
            directory=lambda: self.watcher.directory,
            kick=self._kick, tls=server_context(cert, key),
        )
        self.ctx.pressure = self._refusal
        self.watcher.listeners.append(self.reconcile)
        await self.reconcile(self.watcher.directory)

    def _refusal(self, origin: str) -> str | None:
        """Back pressure at MAIL FROM: High refuses everyone, Medium outside senders."""
        if self.level is Level.HIGH or (self.level is Level.MEDIUM and origin == "external"):
            return replies.NO_RESOURCES
        return None

    async def watch_pressure(self) -> None:
        """Once a second: the site's back-pressure level in, the session counters out."""
        while True:
            try:
                value = await self.r.hget(keys.pressure(self.site), "level")
                self.level = Level(int(value)) if value is not None else Level.NORMAL
                await self.ctx.flush_counts()
            except Exception as exc:  # keep the last level while Redis is away
                log.warning("could not read the back-pressure level: %s", exc)
            await asyncio.sleep(1.0)

    def wanted(self, directory: Directory) -> dict[str, tuple[str, list[str]]]:
        """actual address -> (configured binding, connector names) for this hub's site."""
        out: dict[str, tuple[str, list[str]]] = {}
        for conn in directory.org.receive_connectors:
            if not conn.enabled or (conn.sites and self.site not in conn.sites):
                continue
            for binding in conn.bindings:
                actual = self.binds.get(binding, binding)
                out.setdefault(actual, (binding, []))[1].append(conn.name)
        return out

    async def reconcile(self, directory: Directory) -> None:
        wanted = self.wanted(directory)
        for actual in list(self.servers):
            if actual not in wanted:
                self.servers.pop(actual).close()
                log.info("closed listener %s", actual)
        for actual, (binding, names) in wanted.items():
            if actual in self.servers:
                continue
            host, port = _split(actual)
            try:
                self.servers[actual] = await asyncio.get_running_loop().create_server(
                    lambda b=binding: Connection(Receiver(self.ctx), self.ctx, b),
                    host=host, port=port, reuse_address=True, reuse_port=True,
                    family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                )
                self.failed.discard(actual)
                log.info("receive connector(s) %s listening on %s", ", ".join(names), actual)
            except OSError as exc:
                if actual not in self.failed:
                    log.error("cannot listen on %s for %s: %s", actual, ", ".join(names), exc)
                self.failed.add(actual)
        self.publish(wanted)

    def publish(self, wanted: dict[str, tuple[str, list[str]]]) -> None:
        endpoints = {name: advertised(actual) for actual, (_, names) in wanted.items() if actual in self.servers
                     for name in names}
        try:
            nodes.hub_endpoints(self.sync_r, self.hub, endpoints)
        except Exception as exc:
            log.warning("could not publish endpoints: %s", exc)

    async def run(self) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks = [asyncio.create_task(self.watcher.run()), asyncio.create_task(self.watch_pressure())]
        await stop.wait()
        for task in tasks:
            task.cancel()
        for server in self.servers.values():
            server.close()
        await asyncio.gather(*(s.wait_closed() for s in self.servers.values()), return_exceptions=True)


def serve(*, hub: str, site: str, redis_url: str, data_dir: Path, binds: dict[str, str]) -> None:
    asyncio.run(ReceiveServer(hub=hub, site=site, redis_url=redis_url, data_dir=data_dir, binds=binds).run())
