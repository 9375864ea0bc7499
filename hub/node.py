"""The running hub: its identity and the per-process resources its stages share.

Stages (categorizer, store driver, send connector, outcomes, sweeper) are written against
``Hub``, the little a stage needs: the hub's name and site, the queues, the directory and
the transport settings. ``Node`` is the real one; tests of the stages' rules give them a
hub over the in-memory queues (tests/hub/helpers.py).

Celery's prefork pool forks children from the main process; Redis and HTTP clients are
created lazily in each process (a client made before a fork must not be used after it).

A hub's identity to other nodes is its site's certificate of the organization, in
``pki.pki_dir(data_dir)`` (``<data-dir>/pki`` unless ``$MAILYARD_PKI_DIR`` says otherwise):
``Node.relay_tls`` is the client context of its links to hubs of other sites.
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import redis
from celery import Celery

from mailyard import faults, pki, redisconn
from mailyard.broker import DrainMessages
from mailyard.directory import Directory
from mailyard.hub.queues import MailQueues, Worker
from mailyard.hub.redis_queues import RedisQueues
from mailyard.org import Organization, TransportSettings
from mailyard.orgstore import OrgCache

if TYPE_CHECKING:
    from mailyard.hub.mailbox_client import MailboxClient


class Hub(Protocol):
    """What a pipeline stage knows of the hub it runs on."""

    name: str
    site: str

    @property
    def queues(self) -> MailQueues: ...

    @property
    def settings(self) -> TransportSettings: ...

    @property
    def fqdn(self) -> str: ...

    @property
    def worker(self) -> Worker: ...

    def directory(self) -> Directory: ...

    def crash_point(self, name: str) -> None:
        """A place where the fault tests may kill this process (mailyard.faults)."""
        ...


@dataclass
class Node:
    name: str
    site: str
    redis_url: str
    app: Celery
    data_dir: Path | None = None  # where its certificate is (pki.pki_dir); None: the working directory's
    concurrency: int = 0  # its pool's worker processes (``mailyard hub --concurrency``; 0: not known)
    _pid: int = -1
    _res: dict[str, Any] = field(default_factory=dict)

    def _resources(self) -> dict[str, Any]:
        if self._pid != os.getpid():
            self._res = {}
            self._pid = os.getpid()
        return self._res

    @property
    def r(self) -> redis.Redis:
        res = self._resources()
        if "r" not in res:
            res["r"] = redisconn.connect(self.redis_url)
        return res["r"]

    @property
    def queues(self) -> RedisQueues:
        res = self._resources()
        if "queues" not in res:
            res["queues"] = RedisQueues(self.r, DrainMessages(self.app),
                                        lambda: self.settings.message_tracking_log_max_age)
        return res["queues"]

    @property
    def orgs(self) -> OrgCache:
        res = self._resources()
        if "orgs" not in res:
            # Checked at the start of every task (see ``fresh``) and at most once a second
            # within one: a task sees ``org apply`` at once, without a GET per message.
            res["orgs"] = OrgCache(self.r, max_age=1.0)
        return res["orgs"]

    def directory(self) -> Directory:
        return self.orgs.get()

    def crash_point(self, name: str) -> None:
        faults.point(name, self.r)

    @property
    def mailboxes(self) -> MailboxClient:  # the store driver's RPC client
        from mailyard.hub.mailbox_client import MailboxClient

        res = self._resources()
        if "mailboxes" not in res:
            res["mailboxes"] = MailboxClient(self.r, self.name, self.node_cert)
        return res["mailboxes"]

    @property
    def is_edge(self) -> bool:
        """An Edge Transport server's transport (its copy of the organization has ``edge``)."""
        return self.orgs.org.edge is not None

    @property
    def node_cert(self) -> pki.NodeCert:
        """This hub's certificate: its site's, issued by the organization's CA (an Edge's own)."""
        identity = pki.Identity.edge(self.name) if self.is_edge else pki.Identity.hub(self.site)
        return pki.NodeCert(pki.pki_dir(self.data_dir or Path(".")), identity)

    def relay_tls(self) -> ssl.SSLContext:
        """The client context of a link to a hub of another site: it presents this hub's
        certificate and trusts the organization's CA and nothing else. Made again when the
        certificate file changes (renewed); raises SiteError if the hub has none."""
        node = self.node_cert
        node.check()
        stamp = (node.cert_path.stat().st_mtime_ns, node.key_path.stat().st_mtime_ns, node.ca_path.stat().st_mtime_ns)
        res = self._resources()
        cached = res.get("relay_tls")
        if cached is None or cached[0] != stamp:
            ctx = node.client_context()
            # The chain is verified in the handshake (CERT_REQUIRED, the organization's CA only);
            # the name right after it, before anything is sent (send._org_tls, pki.matches), so
            # that the queue's last error can say whose certificate the peer presented.
            ctx.check_hostname = False
            cached = res["relay_tls"] = (stamp, ctx)
        return cached[1]

    @property
    def worker(self) -> Worker:
        return Worker(self.name, os.getpid())

    def fresh(self) -> None:
        """A task begins: the next use of the directory checks its version in Redis."""
        self.orgs.invalidate()

    @property
    def settings(self) -> TransportSettings:
        return self.orgs.org.transport

    @property
    def fqdn(self) -> str:
        return fqdn_of(self.name, self.orgs.org)


def fqdn_of(name: str, org: Organization) -> str:
    """A node's FQDN (its banner, HELO and Received lines): an Edge's is its subscription's
    (its receive connector's); a hub's its name, in the first accepted domain."""
    if org.edge is not None:
        own = next((c.fqdn for c in org.receive_connectors if c.fqdn), "")
        if own:
            return own
    return name if "." in name else f"{name}.{org.accepted_domains[0]}"


def default_name() -> str:
    return socket.gethostname().split(".")[0] or "hub"
