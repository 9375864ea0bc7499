"""One mailbox server process: the store, its HTTP API and the Mail Submission Service."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import uvicorn

from mailyard import faults, redisconn
from mailyard.errors import SiteError
from mailyard.mailbox.api import create_app
from mailyard.mailbox.store import MailboxStore
from mailyard.orgstore import OrgCache
from mailyard.registry import register_server
from mailyard.submission.service import SubmissionService

log = logging.getLogger("mailyard.mailbox")


def serve(
    *,
    server: str,
    redis_url: str,
    data_dir: Path,
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
    store = MailboxStore(data_dir / server, server)

    def my_mailboxes() -> list[str]:
        return [m.address for m in orgs.org.mailboxes if m.server == server]

    for address in my_mailboxes():
        store.ensure(address)

    def outbox_items() -> list[tuple[str, str]]:
        out = []
        for address in my_mailboxes():
            store.ensure(address)
            out += [(address, item) for item in store.ids(address, "Outbox")]
        return out

    service = SubmissionService(r, redis_url, orgs, server, outbox_items)
    app = create_app(
        server=server,
        store=store,
        directory=orgs.get,
        on_submitted=service.submitted,
        on_acknowledged=service.acknowledged,
        fault=lambda name: faults.point(name, r),
    )

    # Bind first, so the port is known (port 0 picks a free one) before anyone is told.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    url = advertise_url or f"http://{host if ':' not in host else f'[{host}]'}:{bound}"

    # h11 rather than httptools: it refuses a header section larger than 64 KB, where
    # httptools buffers any size a client sends (a memory attack on a mailbox server).
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", http="h11",
                            h11_max_incomplete_event_size=64 * 1024)
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
        web.run(sockets=[sock])
    finally:
        stop.set()
        service.stop()
