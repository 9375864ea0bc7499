"""One mailbox server process: the store, its HTTP API and the Mail Submission Service."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mailyard import faults, pki, redisconn
from mailyard.errors import SiteError
from mailyard.mailbox.api import CONNECTION, PEER, create_app
from mailyard.mailbox.outbox import OutboxIndex
from mailyard.mailbox.store import MailboxStore
from mailyard.orgstore import OrgCache
from mailyard.processes import serve_until_stopped
from mailyard.registry import register_server
from mailyard.submission.service import SubmissionService

log = logging.getLogger("mailyard.mailbox")


class _PeerH11(H11Protocol):
    """uvicorn's h11 protocol, telling the app who the client's verified certificate names
    (uvicorn puts nothing of the peer certificate in the ASGI scope). The TLS handshake is
    over when ``connection_made`` runs; ``app_state`` is copied into each request's state."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        identity = pki.peer_identity(transport.get_extra_info("ssl_object"))
        shared: dict[str, bool] = {}
        self.app_state = {**self.app_state, PEER: identity, CONNECTION: shared}
        self._shared = shared
        super().connection_made(_CutAfterRefusal(transport, shared))  # type: ignore[arg-type]

    # A TLS close waits for the client's close_notify, up to asyncio's 30 s, and a client that
    # holds an idle keep-alive connection open (the hubs' pools, an httpx client) never sends
    # one: an idle connection is cut instead, and so is every connection once SIGTERM came
    # (after its last response is written), or stopping would take those 30 s.

    def timeout_keep_alive_handler(self) -> None:
        self._shared["abort"] = True  # (nothing is in flight on an idle connection)
        super().timeout_keep_alive_handler()

    def shutdown(self) -> None:
        self._shared["abort"] = True
        if self.transport.is_closing():  # a TLS close already under way: cut it short
            self.transport.abort()
        super().shutdown()


class _CutAfterRefusal:
    """The connection's transport, whose ``close`` after a refusal aborts instead of a TLS
    shutdown: asyncio's SSL transport would go on reading (and decrypting, and dropping)
    whatever the client sends until its close_notify or 30 s, gigabytes of a refused upload.
    The refusal is written first (as far as the kernel's buffer)."""

    def __init__(self, transport: asyncio.Transport, shared: dict[str, bool]) -> None:
        self._transport = transport
        self._shared = shared

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)

    def close(self) -> None:
        transport = self._transport
        if not self._shared.get("abort") or transport.is_closing():
            transport.close()
            return
        transport.pause_reading()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0

        def cut() -> None:
            if transport.get_write_buffer_size() and loop.time() < deadline:
                loop.call_later(0.01, cut)
                return
            transport.abort()

        cut()


def serve(
    *,
    server: str,
    redis_url: str,
    data_dir: Path,
    pki_dir: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    advertise_url: str | None = None,
) -> None:
    r = redisconn.connect(redis_url)
    orgs = OrgCache(r)
    directory = orgs.get()
    site = directory.site_of_server.get(server)
    if site is None:
        known = ", ".join(sorted(directory.site_of_server)) or "none"
        raise SiteError(f"the organization has no mailbox server {server!r} (known: {known})")
    store = MailboxStore(data_dir / server, server, lambda: orgs.org.transport)

    def my_mailboxes() -> list[str]:
        return [m.address for m in orgs.org.mailboxes if m.server == server]

    # The Outboxes are read once, here; the API keeps the index from now on (mailbox.outbox).
    outbox = OutboxIndex()
    for address in my_mailboxes():
        store.ensure(address)
        outbox.load((address, item) for item in store.ids(address, "Outbox"))

    identity = pki.Identity.mailbox(server)
    node_cert = pki.NodeCert(pki_dir, identity)
    node_cert.check()  # (a clear error now, rather than a TLS failure per request)

    # Bind first, so the port is known (port 0 picks a free one) before anyone is told.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    url = advertise_url or f"https://{host if ':' not in host else f'[{host}]'}:{bound}"
    hosts = frozenset(h.lower() for h in (host, urlsplit(url).hostname or host, identity.dns_name))

    service = SubmissionService(r, redis_url, orgs, server, outbox.items,
                                is_waiting=lambda mailbox, item: (mailbox, item) in outbox)
    app = create_app(
        server=server,
        site=site,
        hosts=hosts,
        store=store,
        directory=orgs.get,
        r=r,
        outbox=outbox,
        on_submitted=service.submitted,
        on_acknowledged=service.acknowledged,
        fault=lambda name: faults.point(name, r),
    )

    # h11 rather than httptools: it refuses a header section larger than 64 KB, where
    # httptools buffers any size a client sends (a memory attack on a mailbox server).
    # TLS only, with the organization's certificate; a client may present one of the
    # organization's (a hub, for the hub API) or log on with a password (CERT_OPTIONAL).
    # uvloop, by name rather than uvicorn's "auto" (which falls back to asyncio's loop
    # silently): measured 15 % less CPU per Send on this server than asyncio's.
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", http=_PeerH11,
                            loop="uvloop",
                            h11_max_incomplete_event_size=64 * 1024,
                            ssl_certfile=str(node_cert.cert_path), ssl_keyfile=str(node_cert.key_path),
                            ssl_ca_certs=str(node_cert.ca_path), ssl_cert_reqs=ssl.CERT_OPTIONAL)
    web = uvicorn.Server(config)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(1.0):
            try:
                register_server(r, server, url, site)
            except Exception as exc:  # Redis may be restarting; keep serving
                log.warning("heartbeat failed: %s", exc)

    register_server(r, server, url, site)
    service.start()
    threading.Thread(target=heartbeat, name="heartbeat", daemon=True).start()
    log.info("mailbox server %s (site %s) serving %s", server, site, url)
    print(f"mailbox server {server} listening on {url}", flush=True)

    try:
        serve_until_stopped(web, [sock])
    finally:
        stop.set()
        service.stop()
