"""Mail flow over time (mailyard.hub.flow): every tracking write counts in its minute, the
sweeper rolls closed minutes up per site and per next hop (the busiest by name, the rest as
``(other)``), a day of it stays small, and a running site's viewer answers ``/api/flow`` with
what a known stream of mail did: delivered, deferred by a refusing next hop, failed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from mailyard import keys, tracking
from mailyard.hub import flow
from mailyard.hub.flow import OTHER, Recorder, summarize
from mailyard.internet.dns import MX, A, DnsServer, Zone
from mailyard.internet.sink import Sink
from mailyard.org import Organization
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from mailyard.tracking import Event, Record
from mailyard.txn import Txn
from tests.conftest import ROOT, make_org
from tests.hub.test_viewer import TOKEN, spawn_viewer, viewer_url

MINUTE = 60_000
T0 = 29_000_000 * MINUTE  # a minute boundary (2025-02-19T05:20Z): the tests' clock


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def track(r: redis.Redis, at_ms: int, *records: Record) -> None:
    txn = Txn()
    for rec in records:
        tracking.add(txn, rec, 86_400.0, now_ms=at_ms)
    assert txn.run(r).ok


def sent(queue: str, n: int = 1, event: Event = Event.DELIVER) -> Record:
    return Record(event, server="hub-1", queue=queue, recipients=[f"r{i}@x.example" for i in range(n)])


# region: the roll-up, pure

def test_a_minute_is_summed_per_site_and_per_next_hop() -> None:
    raw = {"RECEIVE|@hub-1": 3, "RECEIVE|@hub-2": 2, "DELIVER|Amsterdam\\MBX-AMS-01": 4,
           "SEND|Amsterdam\\fabrikam.example": 2, "DEFER|Amsterdam\\fabrikam.example": 5,
           "FAIL|@hub-2": 1, "DEPTH|London\\MBX-LON-01": 7, "sampled": 1}
    fields = summarize(raw, {"hub-1": "Amsterdam", "hub-2": "London"})
    assert fields == {
        "Amsterdam|received": 3, "London|received": 2, "Amsterdam|delivered": 6, "Amsterdam|deferred": 5,
        "London|failed": 1, "London|depth": 7,
        "Amsterdam\\MBX-AMS-01|delivered": 4, "Amsterdam\\fabrikam.example|delivered": 2,
        "Amsterdam\\fabrikam.example|deferred": 5, "London\\MBX-LON-01|depth": 7,
    }


def test_only_the_busiest_next_hops_keep_their_names() -> None:
    raw = {f"SEND|Amsterdam\\d{i}.example": i + 1 for i in range(30)}  # d29 the busiest
    fields = summarize(raw, {}, top=3)
    named = {name.rpartition("|")[0] for name in fields if "\\" in name}
    assert named == {"Amsterdam\\d29.example", "Amsterdam\\d28.example", "Amsterdam\\d27.example",
                     f"Amsterdam\\{OTHER}"}
    assert fields[f"Amsterdam\\{OTHER}|delivered"] == sum(range(1, 28))
    assert fields["Amsterdam|delivered"] == sum(range(1, 31)), "the site's total counts every hop"


def test_a_hub_gone_before_its_minute_was_rolled_up_counts_for_an_unknown_site() -> None:
    assert summarize({"RECEIVE|@gone": 2}, {}) == {f"{flow.UNKNOWN}|received": 2}

# endregion


# region: on Redis

def test_tracking_writes_count_in_their_minute_and_refusals_at_smtp_do_not(r: redis.Redis) -> None:
    track(r, T0 + 5_000, sent("Amsterdam\\MBX-AMS-01", 2), Record(Event.RECEIVE, server="hub-1"))
    track(r, T0 + MINUTE + 1, sent("Amsterdam\\MBX-AMS-01", 1),
          Record(Event.FAIL, source="AGENT", server="hub-1", recipients=["x@y.example"]),  # (refused at RCPT)
          Record(Event.SUBMIT, server="MBX-AMS-01"))  # (counted as its store driver receives it)
    first = {k.decode(): int(v) for k, v in r.hgetall(keys.flow_raw(T0 // MINUTE)).items()}
    second = {k.decode(): int(v) for k, v in r.hgetall(keys.flow_raw(T0 // MINUTE + 1)).items()}
    assert first == {"DELIVER|Amsterdam\\MBX-AMS-01": 2, "RECEIVE|@hub-1": 1}
    assert second == {"DELIVER|Amsterdam\\MBX-AMS-01": 1}
    assert 0 < r.ttl(keys.flow_raw(T0 // MINUTE)) <= tracking.FLOW_RAW_TTL_S


def test_closed_minutes_are_rolled_up_once_and_read_back_with_the_one_now(r: redis.Redis) -> None:
    recorder = Recorder(r)
    for m in range(5):
        track(r, T0 + m * MINUTE + 10, sent("Amsterdam\\MBX-AMS-01", m + 1),
              sent("Amsterdam\\fabrikam.example", 1, Event.DEFER))
    now = T0 + 4 * MINUTE + 30_000  # minute 4 is running, 3 ended too lately to be closed
    assert recorder.roll_up(now) == 3, "minutes 0, 1 and 2"
    assert r.get(keys.FLOW_ROLLED) == str(T0 // MINUTE + 2).encode()
    assert not r.exists(keys.flow_raw(T0 // MINUTE)), "a rolled-up minute's raw counts are gone"
    assert recorder.roll_up(now) == 0, "nothing is rolled up twice"
    assert 0 < r.ttl(keys.flow(T0 // MINUTE)) <= flow.KEEP_S
    got = flow.read(r, now, 6, sites=["London"], hub_sites={})
    assert got.minutes == [(T0 // MINUTE + m) * 60 for m in range(-1, 5)]
    assert got.sites["Amsterdam"]["delivered"] == [0, 1, 2, 3, 4, 5], "rolled up and raw alike"
    assert got.hops["Amsterdam\\fabrikam.example"]["deferred"] == [0, 1, 1, 1, 1, 1]
    assert got.sites["London"]["delivered"] == [0] * 6, "an idle site is drawn as idle"


def test_depth_is_sampled_once_a_minute(r: redis.Redis) -> None:
    recorder = Recorder(r)
    assert recorder.sample_depth(T0 + 1_000)
    assert not recorder.sample_depth(T0 + 30_000), "the first sample of the minute stands"
    assert recorder.sample_depth(T0 + MINUTE)


def test_a_day_of_busy_minutes_stays_small(r: redis.Redis) -> None:
    """1,440 minutes, each with 2 sites, 3 hubs and 500 next hops busy: what is kept is the same
    few fields per minute whatever the number of destinations."""
    hub_sites = {"hub-1": "Amsterdam", "hub-2": "Amsterdam", "hub-3": "London"}
    raw: dict[str, int] = {f"RECEIVE|@{hub}": 40 for hub in hub_sites}
    for i in range(500):
        site = "Amsterdam" if i % 2 else "London"
        raw |= {f"SEND|{site}\\d{i}.example": 1 + i % 7, f"DEFER|{site}\\d{i}.example": i % 3,
                f"FAIL|{site}\\d{i}.example": i % 2, f"DEPTH|{site}\\d{i}.example": i % 11}
    fields = summarize(raw, hub_sites)
    pipe = r.pipeline(transaction=False)
    for m in range(flow.WINDOW_MINUTES):
        pipe.hset(keys.flow(T0 // MINUTE + m), mapping=fields)  # type: ignore[arg-type]
    pipe.execute()
    used = sum(int(r.memory_usage(keys.flow(T0 // MINUTE + m)) or 0) for m in range(flow.WINDOW_MINUTES))
    print(f"a day of flow: {len(fields)} fields a minute, {used / 1e6:.2f} MB")  # (bench figure)
    assert len(fields) <= 5 * 2 + 4 * (flow.TOP_HOPS + 2), fields
    assert used < 6_000_000, f"{used} bytes for a day"  # (4.5 MB measured)
    got = flow.read(r, T0 + (flow.WINDOW_MINUTES - 1) * MINUTE, flow.WINDOW_MINUTES, hub_sites=hub_sites)
    assert len(got.hops) <= flow.TOP_HOPS + 2 and sum(got.sites["Amsterdam"]["received"]) == 80 * 1440

# endregion


# region: a running site

DOMAIN = "flow.example"


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("flow")
    zone = Zone()
    zone.replace(DOMAIN, MX(10, f"mx.{DOMAIN}"))
    zone.replace(f"mx.{DOMAIN}", A("127.0.0.6"))
    dns = DnsServer(zone).start()
    sink = Sink(tmp / "sink", host="127.0.0.6").start()
    sink.add_rule(f"later@{DOMAIN}", "451 4.3.2 Try again later", times=2)  # (then taken)
    sink.add_rule(f"gone@{DOMAIN}", "550 5.1.1 User unknown")
    data = make_org().model_dump(mode="json")
    data["transport"]["dns_servers"] = [dns.address]
    for conn in data["send_connectors"]:
        conn["port"] = sink.port
    cluster = Cluster(redis_server.new_db(), tmp / "site", Organization.model_validate(data), cwd=ROOT)
    try:
        cluster.start_mailboxes(["MBX-AMS-01"])
        hub = cluster.start_hub("Amsterdam", "flow-1", wait=False)
        viewer = spawn_viewer(cluster, "viewer", "--token", TOKEN)
        cluster.wait_hub(hub)
        yield {"site": cluster, "sink": sink, "viewer": viewer_url(cluster, viewer)}
    finally:
        cluster.close()
        sink.stop()
        dns.stop()


def api_flow(url: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{url}/api/flow", params=params, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)


def expected(r: redis.Redis) -> Counter[tuple[int, str, str]]:
    """(minute, next hop queue, metric) -> recipients, as the tracking log has them."""
    metric = {"DELIVER": "delivered", "SEND": "delivered", "DEFER": "deferred", "FAIL": "failed"}
    out: Counter[tuple[int, str, str]] = Counter()
    for rec in tracking.search(r, limit=10_000):
        if rec.event in metric and rec.queue:
            out[(rec.time_ms // MINUTE * 60, rec.queue, metric[rec.event])] += len(rec.recipients)
    return out


def test_a_stream_of_mail_is_counted_per_minute_and_per_next_hop(site: dict[str, Any]) -> None:
    # Given a site that carries nothing but this stream: three messages to a mailbox, one to
    # three recipients of a next hop that takes one, defers one twice and refuses one
    cluster: Cluster = site["site"]
    for n in range(3):
        cluster.send("alice@contoso.com", ["bob@contoso.com"], subject=f"flow {n}")
    cluster.send("alice@contoso.com", [f"ok@{DOMAIN}", f"later@{DOMAIN}", f"gone@{DOMAIN}"], subject="flow out")
    hop, mailbox = f"Amsterdam\\{DOMAIN}", "Amsterdam\\MBX-AMS-01"

    def settled() -> Counter[tuple[int, str, str]] | None:
        totals: Counter[tuple[str, str]] = Counter()
        for (_, queue, metric), n in (want := expected(cluster.r)).items():
            totals[(queue, metric)] += n
        # (Alice's NDR for gone@ is a fourth delivery to MBX-AMS-01)
        return want if totals == {(mailbox, "delivered"): 4, (hop, "delivered"): 2, (hop, "deferred"): 2,
                                  (hop, "failed"): 1} else None

    want = wait_until(settled, timeout=90, message=lambda: f"the stream did not settle: {expected(cluster.r)}")

    def drawn() -> Counter[tuple[int, str, str]]:
        got = api_flow(site["viewer"], minutes=10)
        assert got.status_code == 200, got.text
        body = got.json()
        out: Counter[tuple[int, str, str]] = Counter()
        for name, series in body["hops"].items():
            for metric, values in series.items():
                for at, n in zip(body["minutes"], values, strict=True):
                    if n and metric not in ("depth", "received"):
                        out[(at, name, metric)] = n
        return out

    # Then the viewer draws exactly what the tracking log says, minute by minute and hop by hop
    wait_until(lambda: drawn() == want, timeout=30, message=lambda: f"want {want}, drawn {drawn()}")
    body = api_flow(site["viewer"], minutes=10).json()
    assert sum(body["sites"]["Amsterdam"]["received"]) == 4, f"the 4 messages (the NDR was made here): {body['sites']}"
    assert sum(body["sites"]["Amsterdam"]["delivered"]) == 6 and sum(body["sites"]["London"]["delivered"]) == 0
    assert set(body["metrics"]) == {"received", "delivered", "deferred", "failed", "depth"}


def test_the_flow_api_answers_a_bad_window_clearly_and_wants_the_token(site: dict[str, Any]) -> None:
    for bad in ("0", "1441", "soon"):
        got = api_flow(site["viewer"], minutes=bad)
        assert got.status_code == 400 and "minutes" in got.json()["error"], got.text
    anonymous = httpx.get(f"{site['viewer']}/api/flow", timeout=30)
    assert anonymous.status_code == 401

# endregion
