"""``mailyard hub list`` (Get-TransportServer): every hub of every site, alive or dead, with
its version, concurrency, its site's back pressure and its receive connectors; the Queue
Viewer's /api/hubs gives the same rows."""

from __future__ import annotations

import json
import subprocess
import sys
import time
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


def test_a_hubs_page_counts_its_items_in_flight_and_the_sessions_open_on_its_connectors(site: Cluster) -> None:
    import smtplib

    from mailyard import keys
    from mailyard.errors import NotFoundError
    from mailyard.hub.hub_list import hub_detail
    from mailyard.hub.records import ItemStatus

    # Given two items a worker of list-ams-1 holds (as a lease leaves them: active, the lease
    # an hour from now, so that the sweeper leaves them alone) and an open session
    lease_ends_ms = int((time.time() + 3600) * 1000)
    for item in ("flight-1", "flight-2"):
        site.r.zadd(keys.INFLIGHT, {item: lease_ends_ms})
        site.r.hset(keys.item(item), mapping={"hub": "list-ams-1", "lease": "x", "status": ItemStatus.ACTIVE.value})
    try:
        host, port = site.smtp("list-ams-1")
        with smtplib.SMTP(host, port, local_hostname="page.test", timeout=30) as client:
            client.ehlo()

            def default() -> dict:
                page = hub_detail(site.r, "list-ams-1", site.org)
                return next(c for c in page["receive_connectors"] if c["name"] == "Default") | {"page": page}

            found = wait_until(lambda: (d := default())["open_sessions"] == 1 and d, timeout=30,
                               message=lambda: f"{default()}")
            assert found["page"]["in_flight"] == 2 and found["listening"] == f"{host}:{port}"
        wait_until(lambda: default()["open_sessions"] == 0, timeout=30, message="the closed session still counts")
    finally:
        site.r.zrem(keys.INFLIGHT, "flight-1", "flight-2")
        site.r.delete(keys.item("flight-1"), keys.item("flight-2"))
    with pytest.raises(NotFoundError, match="no hub 'nobody'"):
        hub_detail(site.r, "nobody", site.org)


def test_the_connectors_are_listed_with_their_settings_but_never_a_password(site: Cluster) -> None:
    from mailyard.hub.hub_list import connector_rows

    send = [c.model_copy(update={"smart_host_password": "s3cret-smarthost"}) for c in site.org.send_connectors]
    rows = connector_rows(site.r, site.org.model_copy(update={"send_connectors": send}))
    assert [c["name"] for c in rows["send"]] == [c.name for c in send]
    assert all(c["smart_host_password_set"] and "smart_host_password" not in c for c in rows["send"])
    assert "s3cret-smarthost" not in json.dumps(rows)
    default = next(c for c in rows["receive"] if c["name"] == "Default")
    assert default["bindings"], default
    # (a session another test closed a moment ago counts until its hub's next second)
    wait_until(lambda: next(c for c in connector_rows(site.r, site.org)["receive"]
                            if c["name"] == "Default")["open_sessions"]["total"] == 0,
               timeout=30, message="no session is open, yet one is counted")
