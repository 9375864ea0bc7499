"""``mailyard hub list`` (Get-TransportServer): every hub of every site, alive or dead, with
its version, concurrency, its site's back pressure and its receive connectors; the Queue
Viewer's /api/hubs gives the same rows."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from mailyard import __version__
from mailyard.hub.hub_list import hub_rows
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT, make_org


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(redis_server.new_db(), tmp_path_factory.mktemp("hub-list"), make_org(), cwd=ROOT)
    try:
        cluster.start_hub("Amsterdam", "list-ams-1", concurrency=3)
        cluster.start_hub("London", "list-lon-1", concurrency=1)
        yield cluster
    finally:
        cluster.close()


def hub_list(site: Cluster, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "mailyard", "hub", "list", *args, "--redis-url", site.redis_url],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, env=site._env(None))
    assert done.returncode == 0, done.stderr
    return done


def test_the_list_shows_each_hub_alive_with_its_version_concurrency_and_connectors(site: Cluster) -> None:
    def complete() -> list[dict] | None:  # (once both heartbeats carry their connectors)
        rows = json.loads(hub_list(site, "--json").stdout)
        return rows if len(rows) == 2 and all(r["concurrency"] and r["endpoints"] for r in rows) else None

    rows = wait_until(complete, timeout=60, message=lambda: hub_list(site, "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["list-ams-1", "list-lon-1"], "by site, then name"
    ams = by_name["list-ams-1"]
    assert ams["site"] == "Amsterdam" and ams["alive"] and ams["version"] == __version__
    assert ams["concurrency"] == 3 and by_name["list-lon-1"]["concurrency"] == 1
    assert ams["back_pressure"] == "Normal" and ams["under_pressure"] == []
    assert set(ams["endpoints"]) >= {"Default"}, ams["endpoints"]
    text = hub_list(site).stdout
    assert text.splitlines()[0].split()[:4] == ["Name", "Site", "State", "Version"], text
    assert "list-ams-1" in text and "alive" in text and "Normal" in text


def test_a_killed_hub_is_listed_dead_with_how_long_it_has_been_silent(site: Cluster) -> None:
    site.kill("list-lon-1")
    timeout_s = float(site.org.transport.hub_heartbeat_timeout)
    row = wait_until(lambda: next((r for r in hub_rows(site.r, timeout_s) if r["name"] == "list-lon-1"
                                   and not r["alive"]), None), timeout=60)
    assert row["heartbeat_age_seconds"] >= timeout_s  # (rounded to a tenth)
    line = next(line for line in hub_list(site).stdout.splitlines() if line.startswith("list-lon-1"))
    assert "dead (" in line and "s silent)" in line, line
    assert next(r for r in hub_rows(site.r, timeout_s) if r["name"] == "list-ams-1")["alive"]
