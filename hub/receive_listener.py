"""The hub's receive listener: the process that listens on every binding of its site's receive
connectors, and its supervisor in the hub's worker.

The hub's Celery worker starts the listener (``ListenerProcess``) as a process of its own,
``python -m mailyard.hub.receive_listener``, because aiosmtpd's protocol code needs a core of
its own under load; the worker restarts it when it exits, and it dies with the worker. In the
listener, ``ReceiveListener`` binds the connectors and runs the event loop: a
``ReceiveProtocol`` with a ``ReceiveHandler`` for every connection. Listeners follow the
organization: a connector added, removed or rebound with ``mailyard org apply`` opens or
closes its listener within a second. Where the hub runs, a binding of the organization file
(``0.0.0.0:25``) may be mapped to another address (``127.0.0.1:2525``): the local site gives
each hub its own ports that way. Once a second the listener reads the site's back-pressure
level, writes out its session counters, and tries again to listen where it could not.

TLS (``tls_contexts``): the hub's own certificate (self-signed unless one is configured, as
Exchange 2010 makes one at install) for every client, and the site's certificate of the
organization (``<data-dir>/pki``, ``mailyard.pki``) for a client that asks for the site's
name under ``hub.mailyard.internal``: the name a hub of another site checks when it relays.
A hub without that certificate still receives mail, but no other hub can log on to it (and
it says so at start).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import uvloop

from mailyard import keys, pki, redisconn, registry
from mailyard.broker import DrainMessages, make_app
from mailyard.directory import Directory
from mailyard.errors import SiteError
from mailyard.hub.node import fqdn_of
from mailyard.hub.pressure import Level
from mailyard.hub.receive_handler import ReceiveHandler
from mailyard.hub.receive_protocol import ReceiveContext, ReceiveProtocol
from mailyard.hub.redis_queues import RedisQueues
from mailyard.orgstore import AsyncOrgWatcher
from mailyard.processes import die_with_parent, setup_logging
from mailyard.redisconn import number
from mailyard.tls import self_signed, server_context

log = logging.getLogger("mailyard.hub.receive")

ENTRY_POINT = "mailyard.hub.receive_listener"  # python -m ENTRY_POINT runs the listener process


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


# region: in the listener process


def tls_contexts(cert: Path, key: Path, node: pki.NodeCert | None) -> tuple[ssl.SSLContext, ssl.SSLContext | None]:
    """The receive connectors' TLS contexts: (for every connector, for connectors with
    ExchangeServer). Both present ``cert`` unless the client asks for a name under
    ``hub.mailyard.internal`` (SNI): then the site's certificate of the organization (``node``).
    The second also asks the client for a certificate and verifies one against the
    organization's CA only (CERT_OPTIONAL: a client without one logs on another way, one that
    does not verify fails the handshake). OpenSSL keeps the verify mode of the context a
    connection started with when SNI switches it, so asking for a client certificate is
    decided by the connector, not by the name asked for; None without ``node``."""
    own = server_context(cert, key)
    if node is None:
        return own, None
    org = node.server_context(client_certs=True)
    suffix = f".{node.identity.role}.{pki.DOMAIN}"  # (an Edge's: <edge>.edge.mailyard.internal)

    def by_name(ssl_object: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
        if name and name.lower().endswith(suffix):
            ssl_object.context = org

    mutual = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    mutual.minimum_version = ssl.TLSVersion.TLSv1_2
    mutual.load_cert_chain(cert, key)
    mutual.load_verify_locations(cafile=str(node.ca_path))  # the organization's CA, nothing else
    mutual.verify_mode = ssl.CERT_OPTIONAL
    for ctx in (own, mutual):
        ctx.sni_callback = by_name
    return own, mutual


def site_cert(data_dir: Path, identity: pki.Identity) -> pki.NodeCert | None:
    """The site's certificate of the organization (an Edge's own), or None (logged: no hub can
    log on here)."""
    node = pki.NodeCert(pki.pki_dir(data_dir), identity)
    try:
        node.check()
    except SiteError as exc:
        log.error("%s; hubs of other sites cannot relay to this hub until it has one", exc)
        return None
    return node


class ReceiveListener:
    """One hub's listeners, one per actual address its site's connectors are bound to."""

    def __init__(self, *, hub: str, site: str, redis_url: str, data_dir: Path,
                 binds: dict[str, str] | None = None) -> None:
        self.hub = hub
        self.site = site
        self.redis_url = redis_url
        self.data_dir = data_dir
        self.binds = binds or {}
        self.servers: dict[str, asyncio.Server] = {}  # actual address -> listener
        self.failed: set[str] = set()
        self._reconciling = asyncio.Lock()

    async def start(self) -> None:
        self.r = redisconn.connect_async(self.redis_url)
        self.sync_r = redisconn.connect(self.redis_url)
        self.app = make_app(self.redis_url)
        self.watcher = AsyncOrgWatcher(self.r)
        await self.watcher.refresh()
        org = self.watcher.current().org
        fqdn = fqdn_of(self.hub, org)
        tls_dir = self.data_dir / "tls"
        cert, key = tls_dir / f"{self.hub}.crt", tls_dir / f"{self.hub}.key"
        self_signed(cert, key, fqdn)
        identity = pki.Identity.edge(self.hub) if org.edge is not None else pki.Identity.hub(self.site)
        own, mutual = tls_contexts(cert, key, site_cert(self.data_dir, identity))
        self.ctx = ReceiveContext(
            hub=self.hub, site=self.site, fqdn=fqdn, r=self.r, sync_r=self.sync_r,
            directory=self.watcher.current,
            queues=RedisQueues(self.sync_r, DrainMessages(self.app),
                               lambda: self.watcher.current().org.transport.message_tracking_log_max_age),
            tls=own, mutual_tls=mutual,
        )
        self.watcher.listeners.append(self.reconcile)
        await self.reconcile(self.watcher.current())

    async def watch_pressure(self) -> None:
        """Once a second: the site's back-pressure level in, the session counters out."""
        while True:
            try:
                value = await self.r.hget(keys.pressure(self.site), "level")
                self.ctx.level = Level(number(value, default=Level.NORMAL))
                await self.ctx.flush_counts()
            except Exception as exc:  # keep the last level while Redis is away
                log.warning("could not read the back-pressure level: %s", exc)
            if self.failed:  # an address that was taken (a restarted hub's old listener, closing) may be free now
                await self.reconcile(self.watcher.current())
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
        async with self._reconciling:  # (the organization's watcher and the retry both call it)
            await self._reconcile(directory)

    async def _reconcile(self, directory: Directory) -> None:
        wanted = self.wanted(directory)
        self.failed &= set(wanted)
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
                    lambda b=binding: ReceiveProtocol(ReceiveHandler(self.ctx), self.ctx, b),
                    # No SO_REUSEPORT: a second listener on the address (another site's hub)
                    # must fail, not silently take half of its connections.
                    host=host, port=port, reuse_address=True,
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
            registry.hub_endpoints(self.sync_r, self.hub, endpoints)
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
    """Run a hub's receive listener until SIGTERM or SIGINT, on uvloop: measured beside asyncio's
    own loop (issue 13's note), the relay's CPU per message is about the same, its p99 lower."""
    uvloop.run(ReceiveListener(hub=hub, site=site, redis_url=redis_url, data_dir=data_dir, binds=binds).run())


def main(argv: list[str] | None = None) -> None:
    """``python -m mailyard.hub.receive_listener --hub H --site S --data-dir D [--bind ...]``, with
    Redis's URL in ``MAILYARD_REDIS_URL`` (it holds the password: never on a command line)."""
    parser = argparse.ArgumentParser(prog="python -m mailyard.hub.receive_listener",
                                     description="A hub's receive listener (started by its worker).")
    parser.add_argument("--hub", required=True)
    parser.add_argument("--site", required=True)
    parser.add_argument("--redis-url", default=redisconn.url_from_env(),
                        help=f"Redis (default: ${redisconn.ENV_URL}, where the worker puts it)")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--bind", dest="binds", action="append", default=[], metavar="CONFIGURED=HOST:PORT")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    try:
        binds = parse_binds(args.binds)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.redis_url:
        parser.error(f"no Redis: set {redisconn.ENV_URL}")
    setup_logging(args.loglevel)
    serve(hub=args.hub, site=args.site, redis_url=args.redis_url, data_dir=args.data_dir, binds=binds)


# endregion

# region: in the hub's worker


class ListenerProcess:
    """Start, watch and stop the hub's receive listener from the worker's main process."""

    def __init__(self, *, hub: str, site: str, redis_url: str, data_dir: Path, binds: list[str],
                 loglevel: str = "INFO") -> None:
        self.cmd = [sys.executable, "-m", ENTRY_POINT, "--hub", hub, "--site", site,
                    "--data-dir", str(data_dir), "--loglevel", loglevel]
        for bind in binds:
            self.cmd += ["--bind", bind]
        # Redis's URL holds its password: in the environment, not in everyone's `ps`.
        self.env = {**os.environ, redisconn.ENV_URL: redis_url}
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="receive-watch", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        # Output goes where the hub's goes; the process dies with the hub (PDEATHSIG).
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, env=self.env, preexec_fn=die_with_parent)

    def _watch(self) -> None:
        backoff = 0.5
        while not self._stop.wait(0.5):
            if self.proc is not None and self.proc.poll() is not None:
                log.warning("receive listener exited with status %s; restarting in %.1fs",
                            self.proc.returncode, backoff)
                if self._stop.wait(backoff):
                    return
                self._spawn()
                backoff = min(backoff * 2, 30.0)

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# endregion


if __name__ == "__main__":
    main()
