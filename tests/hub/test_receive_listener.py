"""The receive listener: a process of its own, started (and started again) by the hub's worker
through its own entry point, that follows the organization's connectors without a restart;
and the ``--bind`` mapping of configured bindings to the addresses it listens on."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from mailyard.hub.receive_listener import ENTRY_POINT, ListenerProcess, advertised, main, parse_binds
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.hostile.helpers import receive_pid
from tests.hub.receive_site import HUB, connect, receive_org, receive_site, reply, with_connector

# region: bindings (no process)


def test_a_bind_maps_a_configured_binding_to_the_address_listened_on() -> None:
    assert parse_binds(["0.0.0.0:25=127.0.0.1:2525", " 0.0.0.0:587 = [::1]:2587 "]) == {
        "0.0.0.0:25": "127.0.0.1:2525", "0.0.0.0:587": "[::1]:2587"}
    for wrong in ("0.0.0.0:25", "0.0.0.0:25=127.0.0.1"):
        with pytest.raises(ValueError, match="CONFIGURED=HOST:PORT"):
            parse_binds([wrong])


def test_other_hubs_reach_a_listener_on_every_address_by_this_hosts_name() -> None:
    assert advertised("0.0.0.0:25") == f"{socket.gethostname()}:25"
    assert advertised("[::]:2525") == f"{socket.gethostname()}:2525"
    assert advertised("127.0.0.1:2525") == "127.0.0.1:2525"


def test_the_entry_point_refuses_a_malformed_bind_before_listening(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--hub", "h", "--site", "s", "--redis-url", "redis://127.0.0.1:1", "--data-dir", "var",
              "--bind", "0.0.0.0:25"])
    assert exited.value.code == 2 and "CONFIGURED=HOST:PORT" in capsys.readouterr().err


def test_the_worker_starts_the_listener_through_its_own_entry_point_not_the_cli() -> None:
    process = ListenerProcess(hub="h", site="s", redis_url="redis://r", data_dir=Path("var"),
                              binds=["0.0.0.0:25=127.0.0.1:2525"])
    assert ENTRY_POINT == "mailyard.hub.receive_listener"
    assert process.cmd[:3] == [sys.executable, "-m", ENTRY_POINT]
    assert process.cmd[-2:] == ["--bind", "0.0.0.0:25=127.0.0.1:2525"]


# endregion

# region: the listener process of a running hub


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory):
    with receive_site(redis_server, tmp_path_factory.mktemp("receive-listener"), mailboxes=False) as cluster:
        yield cluster


def test_a_listener_that_dies_is_started_again_by_its_hub(site: Cluster) -> None:
    # Given the hub's listener, a child of the hub's worker
    hub_pid, listener = site.procs[HUB].pid, receive_pid(site)
    connect(site).quit()
    # When it dies
    os.kill(listener, signal.SIGKILL)
    # Then the worker starts another, which takes connections again, and the hub itself goes on
    wait_until(lambda: receive_pid(site) != listener, timeout=30, message="the listener was not started again")
    client = wait_until(lambda: connect(site, "Internet", source="127.0.0.2"), timeout=15)
    assert reply(client, "MAIL FROM:<someone@example.org>")[0] == 250
    client.quit()
    assert site.procs[HUB].pid == hub_pid and site.procs[HUB].alive


def test_a_receive_connector_change_takes_effect_without_a_restart(site: Cluster) -> None:
    pid, listener = site.procs[HUB].pid, receive_pid(site)
    changed = with_connector(site.org, {"name": "Internet", "bindings": ["0.0.0.0:25"],
                                        "permission_groups": ["ExchangeUsers"], "auth_mechanisms": ["Tls"]})
    site.apply(changed)

    def refused() -> bool:
        client = connect(site, "Internet", source="127.0.0.2")
        code, _ = reply(client, "MAIL FROM:<someone@example.org>")
        client.quit()
        return code == 530

    try:
        wait_until(refused, timeout=15, message="anonymous mail still accepted after the change")
        assert site.procs[HUB].pid == pid and site.procs[HUB].alive
        assert receive_pid(site) == listener, "the listener was restarted"
    finally:
        site.apply(receive_org())
        wait_until(lambda: not refused(), timeout=15)


# endregion
