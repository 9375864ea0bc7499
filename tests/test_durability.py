"""Acknowledge only what a replica has (transport ``durability``; mailyard.durability).

Real Redis servers (a primary and a replica started with ``--replicaof``), a real hub and
mailbox servers, SMTP over sockets and the mailbox API over HTTPS. Each test has its own
servers and ports. What is asserted at the moment of an answer is read from the replica
itself; everything after it is polled with a generous deadline.
"""

from __future__ import annotations

import signal
import smtplib
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from mailyard import durability, redisconn, tracking
from mailyard.org import Organization
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT
from tests.hub.receive_site import HUB, receive_org

pytestmark = pytest.mark.slow  # (real servers and a real hub: handed out first, see tests/conftest.py)

SENDER = "alice@contoso.com"  # on MBX-AMS-01
RECIPIENT = "bob@contoso.com"
DEADLINE = 90.0


def org_with(mode: str) -> Organization:
    org = receive_org()
    return org.model_copy(update={"transport": org.transport.model_copy(update={"durability": mode})})


def start_replica(primary: RedisServer, data_dir: Path) -> RedisServer:
    replica = RedisServer(data_dir, replica_of=primary, databases=primary.databases).start()
    wait_linked(primary, replica)
    return replica


def wait_linked(primary: RedisServer, replica: RedisServer) -> None:
    """The replica has synced and the primary counts it as a good replica."""
    def linked() -> bool:
        mine = redis.Redis.from_url(replica.url()).info("replication")
        theirs = redis.Redis.from_url(primary.url()).info("replication")
        return mine.get("master_link_status") == "up" and int(theirs.get("connected_slaves", 0)) >= 1
    wait_until(linked, timeout=DEADLINE, message="the replica did not link up")


@contextmanager
def servers(tmp_path: Path, *, min_replicas: int = 0, replica: bool = True
            ) -> Iterator[tuple[RedisServer, RedisServer | None]]:
    primary = RedisServer(tmp_path / "primary", databases=4, min_replicas=min_replicas).start()
    second = start_replica(primary, tmp_path / "replica") if replica else None
    try:
        yield primary, second
    finally:
        for server in (second, primary):
            if server is not None:
                if server.proc and server.proc.poll() is None:
                    server.proc.send_signal(signal.SIGCONT)  # (a stopped one ignores SIGTERM)
                server.stop()


@contextmanager
def site(primary: RedisServer, data_dir: Path, mode: str) -> Iterator[Cluster]:
    cluster = Cluster(primary.url(0), data_dir, org_with(mode), cwd=ROOT)
    try:
        cluster.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
        cluster.start_hub("Amsterdam", HUB)
        cluster.smtp_address = cluster.smtp(HUB, "Internet")  # type: ignore[attr-defined]
        # Restarted when it dies, as site up and compose do (a test asserts it need not be).
        cluster.supervise()
        yield cluster
    finally:
        cluster.close()


def message(subject: str, message_id: str) -> str:
    return (f"From: sender@fabrikam.example\r\nTo: {RECIPIENT}\r\nSubject: {subject}\r\n"
            f"Message-ID: {message_id}\r\n\r\nhello\r\n")


def smtp_send(cluster: Cluster, subject: str, message_id: str) -> tuple[int, str]:
    """One message over SMTP from the Internet; the reply to its DATA. (The listener's address
    as the hub registered it while Redis took writes: a refused heartbeat expires it.)"""
    host, port = cluster.smtp_address  # type: ignore[attr-defined]
    client = smtplib.SMTP(host, port, local_hostname="client.example", timeout=30, source_address=("127.0.0.2", 0))
    try:
        client.ehlo()
        assert client.mail("sender@fabrikam.example")[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        code, text = client.data(message(subject, message_id).encode())
        return code, text.decode()
    finally:
        client.close()


def api_send(cluster: Cluster, subject: str, message_id: str):
    return cluster.http.post(cluster.api(SENDER) + "/outbox", headers={"Content-Type": "application/json"},
                             json={"to": [RECIPIENT], "subject": subject, "body": "hi", "message_id": message_id})


def accepted(cluster: Cluster, subject: str, smtp_id: str, api_subject: str, api_id: str) -> None:
    """The retries the refusals asked for, until they are accepted."""
    last: list[object] = []

    def smtp() -> bool:
        last[:] = [smtp_send(cluster, subject, smtp_id)]
        return last[0][0] == 250  # type: ignore[index]

    def api() -> bool:
        response = api_send(cluster, api_subject, api_id)
        last[:] = [(response.status_code, response.text)]
        return response.status_code == 202
    for check in (smtp, api):
        wait_until(check, timeout=DEADLINE, interval=0.5,
                   message=lambda: f"last answer {last}\n{cluster.all_logs(15)}")


def received(r: redis.Redis, subject: str, source: str = "SMTP") -> list[tracking.Record]:
    return [x for x in tracking.search(r, event="RECEIVE") if x.subject == subject and x.source == source]


def wait_calls(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


def in_folder(cluster: Cluster, address: str, subject: str, folder: str) -> int:
    return sum(1 for i in cluster.folder(address, folder) if i["subject"] == subject)


def test_with_a_replica_each_acknowledgement_comes_once_the_replica_has_the_write(tmp_path: Path) -> None:
    with servers(tmp_path) as (primary, replica), site(primary, tmp_path / "site", "replica") as cluster:
        assert replica is not None
        on_replica = redis.Redis.from_url(replica.url(0))
        # SMTP: at the moment 250 arrives, the replica holds the message's RECEIVE (same transaction)
        subject = f"smtp {uuid.uuid4().hex[:6]}"
        code, text = smtp_send(cluster, subject, f"<{uuid.uuid4().hex}@fabrikam.example>")
        assert code == 250, text
        assert len(received(on_replica, subject)) == 1, "250 before the replica had the message"
        # API Send: at the moment 202 arrives, the replica holds the Outbox item's registration
        api_subject = f"api {uuid.uuid4().hex[:6]}"
        response = api_send(cluster, api_subject, f"<{uuid.uuid4().hex}@contoso.com>")
        assert response.status_code == 202, response.text
        item = response.json()["id"]
        submits = [x for x in tracking.search(on_replica, event="SUBMIT") if x.context.endswith(f"Item:{item}")]
        assert len(submits) == 1, "202 before the replica had the registration"
        # Pickup: once the item is in Sent Items (acknowledged), the replica holds what the hub stored
        wait_until(lambda: in_folder(cluster, SENDER, api_subject, "Sent Items"), timeout=DEADLINE)
        assert len(received(on_replica, api_subject, "STOREDRIVER")) == 1, "acknowledged before the replica had it"
        for s in (subject, api_subject):
            cluster.wait_for_subject(RECIPIENT, s, timeout=DEADLINE)
        assert wait_calls(redis.Redis.from_url(primary.url())) >= 3


def test_a_killed_replica_stops_every_acknowledgement_until_it_is_back(tmp_path: Path) -> None:
    with servers(tmp_path, min_replicas=1) as (primary, replica), site(primary, tmp_path / "site", "replica") as cluster:
        assert replica is not None
        on_primary = redis.Redis.from_url(primary.url(0))
        hub = cluster.procs[HUB].pid
        replica.kill()  # SIGKILL
        refused_at = time.monotonic()
        wait_until(lambda: int(on_primary.info("replication").get("min_slaves_good_slaves", 1)) == 0,
                   timeout=DEADLINE, message="the primary still counts the killed replica")
        # The hub's Celery worker meets the refusal (its BRPOP; and, reconnecting, kombu's
        # restore lock, as after a failover) and waits it out instead of exiting
        on_primary.client_kill_filter(_type="normal", skipme=True)
        wait_until(lambda: "NOREPLICAS" in cluster.tail(HUB, 400), timeout=DEADLINE,
                   message=lambda: cluster.tail(HUB))
        clients = int(on_primary.info("clients")["connected_clients"])
        # Given a primary that refuses writes (NOREPLICAS): nothing is acknowledged
        subject, smtp_id = f"smtp {uuid.uuid4().hex[:6]}", f"<{uuid.uuid4().hex}@fabrikam.example>"
        code, text = smtp_send(cluster, subject, smtp_id)
        assert (code, text.split(" ", 1)[0]) == (451, "4.3.0"), text
        assert "NOREPLICAS" in text, text
        api_subject, api_id = f"api {uuid.uuid4().hex[:6]}", f"<{uuid.uuid4().hex}@contoso.com>"
        response = api_send(cluster, api_subject, api_id)
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == str(durability.RETRY_AFTER_S)
        assert "NOREPLICAS" in response.json()["error"]
        assert received(on_primary, subject) == [], "the primary holds nothing the refusal did not say"
        assert in_folder(cluster, SENDER, api_subject, "Sent Items") == 0

        # (10 s and more of refusals by now: the hub's reconnecting left no connection open behind it)
        assert int(on_primary.info("clients")["connected_clients"]) <= clients + 20, on_primary.client_list()

        # When the replica is back, the retries the answers asked for are accepted, and all arrives once
        replica.start()
        wait_linked(primary, replica)
        accepted(cluster, subject, smtp_id, api_subject, api_id)
        for s in (subject, api_subject):
            cluster.wait_for_subject(RECIPIENT, s, timeout=DEADLINE)
        wait_until(lambda: in_folder(cluster, SENDER, api_subject, "Sent Items"), timeout=DEADLINE)
        assert in_folder(cluster, RECIPIENT, subject, "Inbox") == 1
        assert in_folder(cluster, RECIPIENT, api_subject, "Inbox") == 1
        assert in_folder(cluster, SENDER, api_subject, "Outbox") == 0
        assert cluster.procs[HUB].pid == hub, f"the hub had to be restarted:{cluster.tail(HUB, 80)}"
        # (and its log says so once, not at every one of its retries)
        retries = cluster.tail(HUB, 100_000).count("Connection to broker lost. Trying to re-establish the connection... "
                                                   "(network:WritesRefused)")
        assert retries <= 1 + (time.monotonic() - refused_at) / 30, \
            f"{retries} lines of the worker's reconnecting{cluster.tail(HUB, 80)}"


def test_a_stalled_replica_confirms_nothing_so_nothing_is_acknowledged_and_then_all_flows_once(tmp_path: Path) -> None:
    # A replica that is connected but does not answer (SIGSTOP) and a primary that takes writes
    # all the same (no min-replicas-to-write): each write reaches the primary, WAIT times out.
    with servers(tmp_path) as (primary, replica), site(primary, tmp_path / "site", "replica") as cluster:
        assert replica is not None and replica.proc is not None
        on_primary = redis.Redis.from_url(primary.url(0))
        replica.proc.send_signal(signal.SIGSTOP)
        try:
            subject, smtp_id = f"smtp {uuid.uuid4().hex[:6]}", f"<{uuid.uuid4().hex}@fabrikam.example>"
            code, text = smtp_send(cluster, subject, smtp_id)
            assert (code, text.split(" ", 1)[0]) == (451, "4.3.0"), text
            assert "no replica confirmed the write" in text, text
            api_subject, api_id = f"api {uuid.uuid4().hex[:6]}", f"<{uuid.uuid4().hex}@contoso.com>"
            response = api_send(cluster, api_subject, api_id)
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"] == str(durability.RETRY_AFTER_S)
            # The hub was kicked and picked the item up (its RECEIVE is on the primary), but did
            # not acknowledge it: it is still in the Outbox, not in Sent Items.
            wait_until(lambda: received(on_primary, api_subject, "STOREDRIVER"), timeout=DEADLINE,
                       message=lambda: cluster.all_logs(20))
            assert in_folder(cluster, SENDER, api_subject, "Outbox") == 1
            assert in_folder(cluster, SENDER, api_subject, "Sent Items") == 0
        finally:
            replica.proc.send_signal(signal.SIGCONT)
        wait_linked(primary, replica)
        # Then the retries are accepted and every message arrives exactly once (the pickup again
        # finds its item stored, by its Outbox ref; the mailbox, the SMTP copy by its Message-ID)
        accepted(cluster, subject, smtp_id, api_subject, api_id)
        wait_until(lambda: in_folder(cluster, SENDER, api_subject, "Sent Items"), timeout=DEADLINE,
                   message=lambda: cluster.all_logs(20))
        for s in (subject, api_subject):
            cluster.wait_for_subject(RECIPIENT, s, timeout=DEADLINE)
        assert len(received(on_primary, api_subject, "STOREDRIVER")) == 1, "picked up into the Submission queue once"
        assert in_folder(cluster, RECIPIENT, api_subject, "Inbox") == 1
        assert in_folder(cluster, RECIPIENT, subject, "Inbox") == 1


def test_local_never_waits_and_needs_no_replica(tmp_path: Path) -> None:
    with servers(tmp_path, replica=False) as (primary, _), site(primary, tmp_path / "site", "local") as cluster:
        on_primary = redis.Redis.from_url(primary.url(0))
        subject = f"smtp {uuid.uuid4().hex[:6]}"
        assert smtp_send(cluster, subject, f"<{uuid.uuid4().hex}@fabrikam.example>")[0] == 250
        api_subject = f"api {uuid.uuid4().hex[:6]}"
        assert api_send(cluster, api_subject, f"<{uuid.uuid4().hex}@contoso.com>").status_code == 202
        for s in (subject, api_subject):
            cluster.wait_for_subject(RECIPIENT, s, timeout=DEADLINE)
        wait_until(lambda: in_folder(cluster, SENDER, api_subject, "Sent Items"), timeout=DEADLINE)
        assert wait_calls(on_primary) == 0


# region: which setting applies (auto)

@pytest.mark.parametrize(("setting", "sentinel", "info", "expected"), [
    ("local", True, {"connected_slaves": 2}, False),
    ("replica", False, None, True),
    ("auto", True, None, True),  # a Sentinel-managed primary
    ("auto", False, {"connected_slaves": 1}, True),
    ("auto", False, {"connected_slaves": 0, "min_slaves_good_slaves": 0}, True),  # min-replicas-to-write set
    ("auto", False, {"connected_slaves": 0}, False),
    ("auto", False, None, False),
])
def test_auto_means_replica_under_sentinel_or_with_replicas_configured(setting, sentinel, info, expected) -> None:
    assert durability.decide(setting, sentinel=sentinel, replication=info) is expected


def test_auto_reads_the_primary(tmp_path: Path) -> None:
    alone = RedisServer(tmp_path / "alone", databases=1).start()
    guarded = RedisServer(tmp_path / "guarded", databases=1, min_replicas=1).start()
    try:
        assert durability.replicated("auto", redis.Redis.from_url(alone.url())) is False
        assert durability.replicated("auto", redis.Redis.from_url(guarded.url())) is True
    finally:
        alone.stop()
        guarded.stop()

# endregion


# region: how many replicas a write waits for (every online one)

def test_every_online_replica_counts_and_one_silent_too_long_does_not() -> None:
    info = {"role": "master", "connected_slaves": 3,
            "slave0": {"ip": "127.0.0.1", "port": 7001, "state": "online", "offset": 90, "lag": 0},
            "slave1": {"ip": "127.0.0.1", "port": 7002, "state": "online", "offset": 80,
                       "lag": durability.REPLICA_MAX_LAG_S + 1},  # stopped answering
            "slave2": {"ip": "127.0.0.1", "port": 7003, "state": "wait_bgsave", "offset": 0, "lag": 0}}
    assert durability.online_replicas(info) == 1
    assert durability.online_replicas({"role": "master", "connected_slaves": 0}) == 0


def write_confirmed(r: redis.Redis, key: str) -> durability.Unreplicated | None:
    """One replicated write, as an acknowledgement point makes it: None once confirmed."""
    from mailyard.txn import Txn, run_all
    assert durability.replicated("replica", r)  # (reads the count of online replicas)
    try:
        run_all(r, [Txn().op("SET", key, "1")], replicated=True)
    except durability.NotReplicated as exc:
        return exc.outcome
    return None


def test_with_two_replicas_a_write_is_acknowledged_once_both_have_it_until_one_falls_silent(tmp_path: Path) -> None:
    # The Sentinels may promote either replica, so an acknowledged write must be on both. One
    # that stops answering (SIGSTOP, still connected) holds acknowledgements back only until it
    # has been silent REPLICA_MAX_LAG_S; then the other alone confirms.
    with servers(tmp_path) as (primary, first):
        assert first is not None
        second = start_replica(primary, tmp_path / "second")
        try:
            # (redis-py's default socket timeout, 5 s, is WAIT's: a client of its own, as Mailyard's)
            r = redisconn.connect(primary.url(0))
            wait_until(lambda: durability.online_replicas(r.info("replication")) == 2, timeout=DEADLINE,
                       message="both replicas online")
            time.sleep(durability.COUNT_TTL_S)  # (a count read before the second linked up ages out)
            assert write_confirmed(r, "both") is None
            for replica in (first, second):
                assert redis.Redis.from_url(replica.url(0)).get("both") == b"1", f"not on {replica.url()}"
            assert second.proc is not None
            second.proc.send_signal(signal.SIGSTOP)
            try:
                refused = write_confirmed(r, "one")
                assert refused is not None and refused.reason.startswith("1 of 2 replicas confirmed"), refused
                # (then, the silent one no longer counted, the other confirms alone)
                wait_until(lambda: write_confirmed(r, "later") is None, timeout=DEADLINE,
                           message="a replica silent for longer than REPLICA_MAX_LAG_S is still waited for")
            finally:
                second.proc.send_signal(signal.SIGCONT)
            assert redis.Redis.from_url(first.url(0)).get("later") == b"1"
        finally:
            second.stop()

# endregion
