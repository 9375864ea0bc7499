"""The message tracking log (mailyard.tracking) on a real Redis: records are written as part
of the transaction whose change they describe, read back with every field, searched like
Get-MessageTrackingLog, trimmed past retention, and counted in ``my:stats`` for /metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from mailyard import keys, tracking
from mailyard.redisconn import text_map
from mailyard.tracking import Event, Record
from mailyard.txn import Txn, run_all

DAY = 86_400.0


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def write(r: redis.Redis, *records: Record, retention_s: float = DAY) -> None:
    txn = Txn()
    for rec in records:
        tracking.add(txn, rec, retention_s)
    assert txn.run(r).ok


def deliver(msg: str = "m1", rcpts: tuple[str, ...] = ("bob@contoso.com",), **fields: object) -> Record:
    values: dict = {"server": "HUB-1", "internal_id": msg, "message_id": f"<{msg}@contoso.com>",
                    "sender": "alice@contoso.com", "subject": "Hello", "size": 1234,
                    "queue": "Amsterdam\\MBX-AMS-01", "recipients": list(rcpts),
                    "recipient_status": ["250 2.0.0 OK"] * len(rcpts)}
    values.update(fields)
    return Record(Event.DELIVER, **values)


def stats(r: redis.Redis) -> dict[str, str]:
    return text_map(r.hgetall(keys.STATS))


# region: writing


def test_a_record_is_written_only_when_its_transaction_commits(r: redis.Redis) -> None:
    refused = Txn().guard_exists("my:msg:gone")
    tracking.add(refused, deliver(), DAY)
    assert not refused.run(r).ok
    assert tracking.search(r) == [] and stats(r) == {}, "a refused change leaves no record and counts nothing"
    write(r, deliver())
    assert [rec.event for rec in tracking.search(r)] == ["DELIVER"]


def test_every_field_reads_back_as_written(r: redis.Redis) -> None:
    written = deliver(rcpts=("bob@contoso.com", "carol@contoso.com"), client="10.0.0.5", connector="Default",
                      related="all-staff@contoso.com", reference="<orig@x>", context="a; b", source="STOREDRIVER",
                      recipient_status=["250 2.0.0 OK; queued", "550 5.1.1 not; found"])
    before = int(time.time() * 1000)
    write(r, written)
    (found,) = tracking.search(r)
    assert abs(found.time_ms - before) < 5_000, "the record's time is when Redis appended it"
    found.time_ms = written.time_ms
    assert found == written, "recipients and statuses keep their ';' (stored as JSON), size stays a number"


def test_empty_fields_are_not_stored_and_read_back_empty(r: redis.Redis) -> None:
    write(r, Record(Event.RECEIVE, source="SMTP"))
    (entry_id, data), = r.xrange(keys.TRACK)
    assert set(text_map(data)) == {"event", "source"}
    (found,) = tracking.search(r)
    assert (found.recipients, found.size, found.subject) == ([], 0, "")


def test_as_dict_names_every_field_and_the_time_in_utc() -> None:
    d = Record(Event.FAIL, time_ms=1_764_633_600_123).as_dict()
    assert d["time"] == "2025-12-02T00:00:00.123Z"
    assert list(d) == ["time", *tracking.FIELDS]


def test_records_of_one_transaction_keep_their_order(r: redis.Redis) -> None:
    write(r, Record(Event.RECEIVE, internal_id="m1"), Record(Event.SUBMIT, internal_id="m1"),
          deliver("m1"))
    assert [rec.event for rec in tracking.search(r)] == ["RECEIVE", "SUBMIT", "DELIVER"]


# endregion

# region: searching


@pytest.fixture
def log(r: redis.Redis) -> redis.Redis:
    write(r, Record(Event.RECEIVE, source="SMTP", internal_id="m1", message_id="<m1@contoso.com>",
                    sender="Alice@Contoso.com", recipients=["all-staff@contoso.com"]))
    write(r, Record(Event.EXPAND, internal_id="m1", message_id="<m1@contoso.com>", sender="alice@contoso.com",
                    recipients=["bob@contoso.com", "erin@contoso.com"], related="all-staff@contoso.com"))
    write(r, deliver("m1"), deliver("m2", ("Carol@Contoso.com",), sender="dave@contoso.com"))
    return r


def test_search_finds_a_message_by_its_message_id_with_or_without_angle_brackets(log: redis.Redis) -> None:
    assert [rec.event for rec in tracking.search(log, message_id="m1@contoso.com")] == ["RECEIVE", "EXPAND",
                                                                                          "DELIVER"]
    assert len(tracking.search(log, message_id="<m2@contoso.com>")) == 1


def test_search_by_internal_id(log: redis.Redis) -> None:
    assert [rec.internal_id for rec in tracking.search(log, internal_id="m2")] == ["m2"]


def test_search_by_sender_ignores_case(log: redis.Redis) -> None:
    assert len(tracking.search(log, sender="ALICE@contoso.com")) == 3
    assert [rec.internal_id for rec in tracking.search(log, sender="dave@contoso.com")] == ["m2"]


def test_search_by_recipient_matches_a_recipient_or_the_related_group(log: redis.Redis) -> None:
    assert [rec.event for rec in tracking.search(log, recipient="carol@contoso.com")] == ["DELIVER"]
    assert [rec.event for rec in tracking.search(log, recipient="All-Staff@contoso.com")] == ["RECEIVE", "EXPAND"], (
        "the group is a recipient of RECEIVE and the related address of EXPAND")


def test_search_by_event_ignores_case_and_filters_combine(log: redis.Redis) -> None:
    assert len(tracking.search(log, event="deliver")) == 2
    assert [rec.internal_id for rec in tracking.search(log, event="DELIVER", sender="dave@contoso.com")] == ["m2"]
    assert tracking.search(log, event="FAIL") == []


def test_search_returns_at_most_the_limit_oldest_first(log: redis.Redis) -> None:
    assert [rec.event for rec in tracking.search(log, limit=2)] == ["RECEIVE", "EXPAND"]


def test_a_time_window_includes_its_start_and_excludes_its_end(r: redis.Redis) -> None:
    for name in ("a", "b", "c"):
        write(r, Record(Event.RECEIVE, internal_id=name))
        time.sleep(0.003)
    a, b, c = tracking.search(r)
    assert a.time_ms < b.time_ms < c.time_ms
    assert [rec.internal_id for rec in tracking.search(r, start_ms=b.time_ms)] == ["b", "c"]
    assert [rec.internal_id for rec in tracking.search(r, end_ms=b.time_ms)] == ["a"]
    assert [rec.internal_id for rec in tracking.search(r, start_ms=b.time_ms, end_ms=c.time_ms)] == ["b"]


def test_search_reads_past_one_page_of_the_stream(r: redis.Redis) -> None:
    txns = []
    for n in range(2_500):
        txn = Txn()
        tracking.add(txn, Record(Event.RECEIVE, internal_id=str(n)), DAY)
        txns.append(txn)
    assert all(res.ok for res in run_all(r, txns))
    found = tracking.search(r, limit=5_000)
    assert [rec.internal_id for rec in found] == [str(n) for n in range(2_500)], "pages of 1000, in order"
    assert tracking.search(r, internal_id="2499")[0].internal_id == "2499"


# endregion

# region: retention


def test_entries_older_than_the_retention_are_trimmed_as_new_ones_arrive(r: redis.Redis) -> None:
    old = [Txn() for _ in range(350)]
    for n, txn in enumerate(old):
        tracking.add(txn, Record(Event.RECEIVE, internal_id=f"old{n}"), DAY)
    run_all(r, old)
    assert r.xlen(keys.TRACK) == 350, "nothing is older than a day yet"
    time.sleep(0.01)
    write(r, Record(Event.RECEIVE, internal_id="new"), retention_s=0.005)
    kept = tracking.search(r, limit=1_000)
    assert kept[-1].internal_id == "new"
    assert len(kept) <= 101, (
        f"{len(kept)} entries kept: the log trims whole stream nodes (MINID ~) past retention, so at most "
        "one node of old entries may remain")


def test_entries_within_the_retention_are_never_trimmed(r: redis.Redis) -> None:
    for n in range(3):
        write(r, Record(Event.RECEIVE, internal_id=str(n)), retention_s=3600)
    write(r, Record(Event.SUBMIT, internal_id="3"), retention_s=3600)
    assert len(tracking.search(r)) == 4


def test_a_retention_longer_than_the_epoch_trims_nothing(r: redis.Redis) -> None:
    write(r, Record(Event.RECEIVE), retention_s=1e12)
    write(r, Record(Event.SUBMIT), retention_s=1e12)
    assert len(tracking.search(r)) == 2


# endregion

# region: counters


def test_counters_count_recipients_per_event_and_queue(r: redis.Redis) -> None:
    write(r, deliver("m1", ("bob@contoso.com", "alice@contoso.com")), deliver("m2", ("carol@contoso.com",),
                                                                            queue="Amsterdam\\MBX-AMS-02"))
    write(r, deliver("m3", ("dave@contoso.com",), queue="Amsterdam\\MBX-AMS-02"))
    assert stats(r) == {"DELIVER|Amsterdam\\MBX-AMS-01": "2", "DELIVER|Amsterdam\\MBX-AMS-02": "2"}


def test_receive_submit_and_dsn_count_messages_not_recipients(r: redis.Redis) -> None:
    many = ["a@contoso.com", "b@contoso.com", "c@contoso.com"]
    write(r, Record(Event.RECEIVE, source="SMTP", recipients=many), Record(Event.SUBMIT, source="STOREDRIVER",
                                                                           recipients=many),
          Record(Event.DSN, source="DSN", recipients=many))
    assert stats(r) == {"RECEIVE|SMTP": "1", "SUBMIT|STOREDRIVER": "1", "DSN|DSN": "1"}


def test_a_counter_is_labelled_by_queue_else_connector_else_source(r: redis.Redis) -> None:
    write(r, Record(Event.SEND, queue="Amsterdam\\fabrikam.example", connector="Internet", source="SMTP"),
          Record(Event.SEND, connector="Internet", source="SMTP"),
          Record(Event.FAIL, source="ROUTING"),
          Record(Event.DEFER))
    assert stats(r) == {"SEND|Amsterdam\\fabrikam.example": "1", "SEND|Internet": "1", "FAIL|ROUTING": "1",
                        "DEFER|-": "1"}, "an event with no recipient counts one"


# endregion
