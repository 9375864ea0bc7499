"""The running hub: its identity and the per-process resources its tasks share.

Celery's prefork pool forks children from the main process; Redis and HTTP clients are
created lazily in each process (a client made before a fork must not be used after it).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from mailyard import redisconn
from mailyard.broker import TASK_DRAIN
from mailyard.org import TransportSettings
from mailyard.orgstore import OrgCache
from mailyard.txn import Kick, Result, Txn, run_all

log = logging.getLogger("mailyard.hub")


@dataclass
class Node:
    name: str
    site: str
    redis_url: str
    app: Celery
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
    def orgs(self) -> OrgCache:
        res = self._resources()
        if "orgs" not in res:
            # Checked at the start of every task (see ``fresh``) and at most once a second
            # within one: a task sees ``org apply`` at once, without a GET per message.
            res["orgs"] = OrgCache(self.r, max_age=1.0)
        return res["orgs"]

    @property
    def mailboxes(self):  # the store driver's RPC client (mailyard.hub.mailbox_client)
        from mailyard.hub.mailbox_client import MailboxClient

        res = self._resources()
        if "mailboxes" not in res:
            res["mailboxes"] = MailboxClient(self.r, self.name)
        return res["mailboxes"]

    def fresh(self) -> None:
        """A task begins: the next use of the directory checks its version in Redis."""
        self.orgs.invalidate()

    @property
    def settings(self) -> TransportSettings:
        return self.orgs.org.transport

    @property
    def fqdn(self) -> str:
        return self.name if "." in self.name else f"{self.name}.{self.orgs.org.accepted_domains[0]}"

    def kick(self, kicks: list[Kick]) -> None:
        for k in kicks:
            try:
                self.app.send_task(TASK_DRAIN, args=[k.queue], queue=k.route)
            except Exception as exc:  # the sweeper re-sends kicks that never arrived
                log.warning("could not send the drain task for %s: %s", k.queue, exc)

    def commit(self, txn: Txn) -> Result:
        result = txn.run(self.r)
        if result.ok:
            self.kick(result.kicks)
        return result

    def commit_all(self, txns: list[Txn]) -> list[Result]:
        results = run_all(self.r, txns)
        self.kick([k for res in results if res.ok for k in res.kicks])
        return results


def default_name() -> str:
    return socket.gethostname().split(".")[0] or "hub"
