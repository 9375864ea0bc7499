"""Shared fixtures: one real Redis server per session (a database per test), the demo
organization with test-sized timers, and clusters of real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailyard.org import Organization, load_org
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
CONTOSO = ROOT / "deploy" / "contoso.toml"

# Timers that make retries, expiry and failover observable in seconds.
FAST = {
    "submission_ack_timeout": 3,
    "hub_heartbeat_timeout": 3,
    "lease_time": 8,
    "sweep_interval": 0.2,
    "queue_glitch_retry_interval": 1,
    "transient_failure_retry_interval": 1,
    "outbound_connection_failure_retry_interval": 1,
    "message_retry_interval": 1,
    # Logon lockouts count per source address, and every test logs on from 127.0.0.1: tests
    # of the lockouts turn them on (tests/hub/test_receive_abuse.py).
    "logon_failures_per_source": 0,
    "logon_failures_per_account": 0,
    "protocol_errors_per_source": 0,
}


# The receive connectors' tarpits (5 s before every 5xx to an anonymous client, and before
# every failed logon's reply) would make each refusal a test asks for cost 5 s: tests of the
# tarpits set them themselves (tests/hub/test_receive_abuse.py).
FAST_CONNECTORS = {"tarpit_interval": 0, "auth_tarpit_interval": 0}


def make_org(**transport: Any) -> Organization:
    """The demo organization (deploy/contoso.toml) with test timers and any overrides, as a
    site without an Edge runs it (its Internet connectors on: ``site up --no-edge``)."""
    from mailyard.site.edge import with_internet_connectors

    org = with_internet_connectors(load_org(CONTOSO))
    settings = org.transport.model_copy(update={**FAST, **transport})
    connectors = [c.model_copy(update=FAST_CONNECTORS) for c in org.receive_connectors]
    return org.model_copy(update={"transport": settings, "receive_connectors": connectors})


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.new_db()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first, since xdist (``--dist loadfile``) hands files out in this
    order: the compose walkthrough, then every file with a test marked slow, then the rest.
    Collected as they sort, the slow ones came last and ran alone while the other workers
    idled. Each file's tests stay together and in their order (module fixtures hold)."""
    rank: dict[Any, int] = {}
    for item in items:
        here = 0 if item.get_closest_marker("compose") else 1 if item.get_closest_marker("slow") else 2
        rank[item.path] = min(rank.get(item.path, 2), here)
    items.sort(key=lambda item: rank[item.path])


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def cluster_factory(request: pytest.FixtureRequest, redis_server: RedisServer,
                    tmp_path: Path) -> Iterator[Any]:
    """Make clusters of real processes; all are stopped at the end of the test, and their
    logs are printed if the test failed."""
    made: list[Cluster] = []

    def make(org: Organization | None = None, *, cwd: Path | None = ROOT, redis_url: str | None = None,
             name: str = "site") -> Cluster:
        cluster = Cluster(redis_url or redis_server.new_db(), tmp_path / name, org or make_org(), cwd=cwd)
        made.append(cluster)
        return cluster

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for cluster in made:
        if failed:
            print(cluster.all_logs(80))
        cluster.close()
