"""The running hub: its identity and the per-process resources its stages share.

Stages (categorizer, store driver, send connector, outcomes, sweeper) are written against
``Hub``, the little a stage needs: the hub's name and site, the queues, the directory and
the transport settings. ``Node`` is the real one; tests of the stages' rules give them a
hub over the in-memory queues (tests/hub/helpers.py).

Celery's prefork pool forks children from the main process; Redis and HTTP clients are
created lazily in each process (a client made before a fork must not be used after it).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import redis
from celery import Celery

from mailyard import faults, pki, redisconn
from mailyard.broker import DrainMessages
from mailyard.directory import Directory
from mailyard.errors import SiteError
from mailyard.hub.queues import MailQueues, Worker
from mailyard.hub.redis_queues import RedisQueues
from mailyard.org import TransportSettings
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
    def node_cert(self) -> pki.NodeCert: ...

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
    pki_dir: Path | None = None  # where its site's certificate is (mailyard.pki); None: no links
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
    def node_cert(self) -> pki.NodeCert:
        """The certificate this hub proves itself with: its site's, from the organization's CA."""
        if self.pki_dir is None:
            raise SiteError(f"hub {self.name} has no certificate directory")
        return pki.NodeCert(self.pki_dir, pki.Identity.hub(self.site))

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
        return self.name if "." in self.name else f"{self.name}.{self.orgs.org.accepted_domains[0]}"


def default_name() -> str:
    return socket.gethostname().split(".")[0] or "hub"
