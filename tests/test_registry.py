"""The registry of live nodes (mailyard.registry) on a real Redis: hubs heart-beat and are
alive while their last heartbeat is recent; the Mail Submission Service round-robins over
``live_hubs`` of its site; mailbox servers register the URL of their API."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import redis

from mailyard import registry
from mailyard.errors import NotFoundError
from mailyard.registry import HubInfo


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def beat_at(r: redis.Redis, monkeypatch: pytest.MonkeyPatch, when_ms: int, name: str, site: str) -> None:
    """A heartbeat sent at ``when_ms`` (the hub has been silent since)."""
    with monkeypatch.context() as m:
        m.setattr(registry, "now_ms", lambda: when_ms)
        registry.hub_heartbeat(r, name, site, started=when_ms)


def hub(r: redis.Redis, name: str) -> HubInfo:
    (found,) = [h for h in registry.hubs(r) if h.name == name]
    return found


# region: hubs


def test_a_heartbeat_makes_a_hub_known_with_what_it_announces(r: redis.Redis) -> None:
    before = registry.now_ms()
    registry.hub_heartbeat(r, "hub@a1", "Amsterdam", endpoints={"Default": "127.0.0.1:2525"}, started=123,
                           extra={"pids": json.dumps([11, 12])})
    info = hub(r, "hub@a1")
    assert (info.site, info.pid, info.started) == ("Amsterdam", os.getpid(), 123)
    assert info.endpoints == {"Default": "127.0.0.1:2525"} and info.pids == [11, 12]
    assert info.host, "the host name is announced"
    assert before <= info.heartbeat <= registry.now_ms(), "the heartbeat is the time it was sent"


def test_a_hub_that_announces_no_start_time_started_at_its_heartbeat(r: redis.Redis) -> None:
    registry.hub_heartbeat(r, "hub@a1", "Amsterdam")
    info = hub(r, "hub@a1")
    assert info.started == info.heartbeat or abs(info.started - info.heartbeat) < 1000
    assert info.endpoints == {} and info.pids == []


def test_a_later_heartbeat_moves_the_heartbeat_and_keeps_the_endpoints(r: redis.Redis,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    beat_at(r, monkeypatch, 1_000, "hub@a1", "Amsterdam")
    registry.hub_endpoints(r, "hub@a1", {"Default": "127.0.0.1:2525"})
    registry.hub_heartbeat(r, "hub@a1", "Amsterdam", started=1_000)
    info = hub(r, "hub@a1")
    assert info.heartbeat > 1_000 and info.started == 1_000
    assert info.endpoints == {"Default": "127.0.0.1:2525"}, "a heartbeat without endpoints leaves them alone"


def test_a_hub_is_alive_until_its_heartbeat_is_older_than_the_timeout() -> None:
    info = HubInfo("hub@a1", "Amsterdam", heartbeat=10_000)
    assert info.alive(5, now=15_000), "exactly the timeout: still alive"
    assert not info.alive(5, now=15_001)
    assert info.alive(5, now=10_000)


def test_live_hubs_are_the_hubs_of_the_site_that_beat_recently_sorted_by_name(
        r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("hub@c", "hub@a", "hub@b"):
        registry.hub_heartbeat(r, name, "Amsterdam")
    registry.hub_heartbeat(r, "hub@lon", "London")
    beat_at(r, monkeypatch, registry.now_ms() - 60_000, "hub@silent", "Amsterdam")
    assert registry.live_hubs(r, "Amsterdam", 5) == ["hub@a", "hub@b", "hub@c"], (
        "the round robin's input: same order on every mailbox server, no other site, no silent hub")
    assert registry.live_hubs(r, "London", 5) == ["hub@lon"]
    assert registry.live_hubs(r, "Paris", 5) == []
    assert "hub@silent" in registry.live_hubs(r, "Amsterdam", 120), "a longer timeout counts it again"


def test_a_silent_hub_comes_back_with_its_next_heartbeat(r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    beat_at(r, monkeypatch, registry.now_ms() - 60_000, "hub@a", "Amsterdam")
    assert registry.live_hubs(r, "Amsterdam", 5) == []
    registry.hub_heartbeat(r, "hub@a", "Amsterdam")
    assert registry.live_hubs(r, "Amsterdam", 5) == ["hub@a"]


def test_a_hub_that_says_it_is_gone_leaves_the_round_robin_at_once(r: redis.Redis) -> None:
    registry.hub_heartbeat(r, "hub@a", "Amsterdam")
    registry.hub_heartbeat(r, "hub@b", "Amsterdam")
    registry.hub_gone(r, "hub@a")
    assert registry.live_hubs(r, "Amsterdam", 5) == ["hub@b"]
    assert [h.name for h in registry.hubs(r)] == ["hub@b"]


def test_no_hub_has_beaten_yet(r: redis.Redis) -> None:
    assert registry.hubs(r) == [] and registry.live_hubs(r, "Amsterdam", 5) == []


# endregion

# region: mailbox servers


def test_a_registered_mailbox_server_is_found_by_its_name(r: redis.Redis) -> None:
    registry.register_server(r, "MBX-AMS-01", "https://127.0.0.1:8443", "Amsterdam")
    assert registry.server_url(r, "MBX-AMS-01") == "https://127.0.0.1:8443"
    info = registry.servers(r)["MBX-AMS-01"]
    assert (info["url"], info["site"], info["pid"]) == ("https://127.0.0.1:8443", "Amsterdam", str(os.getpid()))
    assert abs(int(info["heartbeat"]) - registry.now_ms()) < 5_000


def test_a_server_that_registers_again_replaces_its_url(r: redis.Redis) -> None:
    registry.register_server(r, "MBX-AMS-01", "https://127.0.0.1:8443", "Amsterdam")
    registry.register_server(r, "MBX-AMS-01", "https://127.0.0.1:9443", "Amsterdam")
    assert registry.server_url(r, "MBX-AMS-01") == "https://127.0.0.1:9443"
    assert list(registry.servers(r)) == ["MBX-AMS-01"]


def test_asking_for_a_server_that_has_not_registered_says_so(r: redis.Redis) -> None:
    with pytest.raises(NotFoundError, match="MBX-LON-01"):
        registry.server_url(r, "MBX-LON-01")
    assert registry.servers(r) == {}


# endregion
