"""One mailbox server process: the store, its HTTP API and the Mail Submission Service."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn

from mailyard import faults, pki, redisconn
from mailyard.errors import SiteError
from mailyard.mailbox.api import create_app
from mailyard.mailbox.outbox import OutboxIndex
from mailyard.mailbox.store import MailboxStore
from mailyard.orgstore import OrgCache
from mailyard.peer_http import PeerH11
from mailyard.processes import serve_until_stopped
from mailyard.registry import register_server
from mailyard.submission.service import SubmissionService

log = logging.getLogger("mailyard.mailbox")


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
    # Listen now, before the address is published: a client that comes as soon as it is (a
    # hub, a test) waits in the backlog while the web server starts instead of being refused.
    sock.listen(2048)
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
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", http=PeerH11,
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
