"""A hub transport node: a Celery worker with the hub's tasks, heartbeat and sweeper.

The worker consumes its own queue ``hub.<name>`` (pickup notifications from the round
robin) and its site's queue ``site.<site>`` (drain tasks of the site's mail queues), plus
``connector.<name>`` for each send connector that lists this hub as a source server.
"""

from __future__ import annotations

import logging
from pathlib import Path

from celery import Celery, bootsteps

from mailyard.broker import TASK_DRAIN, TASK_PICKUP, hub_queue, make_app, site_queue
from mailyard.errors import SiteError
from mailyard.hub import store_driver
from mailyard.hub.node import Node
from mailyard.hub.receive_listener import ListenerProcess
from mailyard.hub.runner import drain as drain_queue
from mailyard.hub.sweeper import Services

log = logging.getLogger("mailyard.hub")


def create(name: str, site: str, redis_url: str, *, data_dir: Path | None = None,
           receive: ListenerProcess | None = None) -> tuple[Celery, Node]:
    app = make_app(redis_url)
    node = Node(name=name, site=site, redis_url=redis_url, app=app, data_dir=data_dir)

    @app.task(name=TASK_PICKUP)
    def pickup(server: str, *_: str) -> None:
        # (versions before December 2026 named one Outbox item too: it goes with the batch)
        node.fresh()
        store_driver.pickup(node, server)

    @app.task(name=TASK_DRAIN)
    def drain(queue: str) -> None:
        node.fresh()
        drain_queue(node, queue)

    class HubServices(bootsteps.StartStopStep):
        """Heartbeat and sweeper threads, alive exactly as long as the worker. Started once the
        pool's processes are forked (a thread importing a module while the pool forks leaves
        the child that module's import lock, held forever: its first task hangs)."""

        requires = ("celery.worker.components:Pool",)

        def __init__(self, worker, **kwargs) -> None:
            super().__init__(worker, **kwargs)
            self.services = Services(node)

        def start(self, worker) -> None:
            self.services.start()
            if receive is not None:
                receive.start()

        def stop(self, worker) -> None:
            if receive is not None:
                receive.stop()
            self.services.stop()

    app.steps["worker"].add(HubServices)
    return app, node


def consumed_queues(node: Node) -> list[str]:
    queues = [hub_queue(node.name), site_queue(node.site)]
    try:
        org = node.orgs.org
    except Exception:
        return queues
    for conn in org.send_connectors:
        if node.name in conn.source_servers:
            queues.append(f"connector.{conn.name}")
    return queues


def run(
    *, name: str, site: str, redis_url: str, data_dir: Path, concurrency: int = 2, pool: str = "prefork",
    loglevel: str = "INFO", receive: bool = True, binds: list[str] | None = None,
) -> None:
    receiver = ListenerProcess(hub=name, site=site, redis_url=redis_url, data_dir=data_dir,
                               binds=binds or [], loglevel=loglevel) if receive else None
    app, node = create(name, site, redis_url, data_dir=data_dir, receive=receiver)
    node.concurrency = concurrency
    try:
        node.node_cert.check()
    except SiteError as exc:
        # Not fatal: the hub still delivers within its site; relays to other sites defer, each
        # with this reason as the queue's last error, until the certificate is there.
        log.error("%s; mail to other sites waits in Retry until this hub has one", exc)
    argv = [
        "worker",
        f"--hostname=hub@{name}",
        f"--queues={','.join(consumed_queues(node))}",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--loglevel={loglevel}",
        "--task-events",
        "--without-mingle",
    ]
    app.worker_main(argv)
