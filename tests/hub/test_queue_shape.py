"""Queue shape (mailyard.hub.queue_shape, ``mailyard queue shape``): a backlog of known ages
(messages accepted into the Submission queue with received times in the past, as intake
writes them) counted per age column, per queue, recipient domain and sender domain."""

from __future__ import annotations

import json

import pytest
import redis
from click.testing import CliRunner

from mailyard.broker import DrainMessages, make_app
from mailyard.cli.main import cli
from mailyard.hub.intake import accept
from mailyard.hub.queue_shape import COLUMNS, bucket, shape
from mailyard.hub.queues import submission_queue
from mailyard.hub.redis_queues import RedisQueues
from tests.conftest import make_org
from tests.hub.helpers import message, record

NOW = 1_800_000_000_000  # ms: the time ages are counted to
MIN = 60_000
SUB = submission_queue("Amsterdam").identity


@pytest.fixture
def backlog(redis_url: str) -> redis.Redis:
    r = redis.Redis.from_url(redis_url)
    queues = RedisQueues(r, DrainMessages(make_app(redis_url)), lambda: 3600.0)
    settings = make_org().transport
    # (age in minutes, sender, recipients)
    for age, sender, rcpts in [(1, "alice@contoso.com", ["bob@contoso.com"]),
                               (1, "alice@contoso.com", ["bob@contoso.com"]),
                               (4.9, "grace@fabrikam.example", ["bob@contoso.com"]),
                               (7, "alice@contoso.com", ["grace@fabrikam.example", "bob@contoso.com"]),
                               (30, "", ["carol@contoso.com"]),
                               (2000, "alice@contoso.com", ["x@tailspintoys.example"])]:
        received = NOW - int(age * MIN)
        msg = message(sender, now=received, expires_in_ms=10 * 86_400_000)
        (item_id,) = queues.new_item_ids(1)
        change = accept(queues.change(), msg, b"Subject: s\r\n\r\nbody\r\n", rcpts, item_id=item_id,
                        settings=settings, now=received, record=record(msg))
        assert queues.commit([change])[0].ok
    return r


def counts(row) -> dict[str, int]:
    return {k: v for k, v in row.as_dict().items() if k != "destination" and v}


def test_the_columns_are_qshapes() -> None:
    assert COLUMNS == ("T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+")
    assert [bucket(m * MIN) for m in (0, 5, 5.01, 10, 1280, 1281)] == [0, 0, 1, 1, 8, 9]


def test_by_queue_counts_each_queue_by_age(backlog: redis.Redis) -> None:
    total, *rows = shape(backlog, by="queue", now_ms=NOW)
    assert total.destination == "TOTAL" and counts(total) == {"T": 6, "5": 3, "10": 1, "40": 1, "1280+": 1}
    assert [(r.destination, counts(r)) for r in rows] == [(SUB, counts(total))]


def test_by_domain_counts_a_message_for_each_recipient_domain(backlog: redis.Redis) -> None:
    total, *rows = shape(backlog, by="domain", now_ms=NOW)
    assert counts(total)["T"] == 6, "the total counts messages, not domains"
    assert [(r.destination, counts(r)) for r in rows] == [
        ("contoso.com", {"T": 5, "5": 3, "10": 1, "40": 1}),
        ("fabrikam.example", {"T": 1, "10": 1}),
        ("tailspintoys.example", {"T": 1, "1280+": 1}),
    ]


def test_by_sender_counts_the_senders_domains_and_the_null_sender(backlog: redis.Redis) -> None:
    _, *rows = shape(backlog, by="sender", now_ms=NOW)
    assert [(r.destination, counts(r)["T"]) for r in rows] == [("contoso.com", 4), ("<>", 1), ("fabrikam.example", 1)]


def test_the_command_prints_the_table_and_json_and_refuses_an_unknown_view(backlog: redis.Redis,
                                                                           redis_url: str) -> None:
    runner = CliRunner()
    shown = runner.invoke(cli, ["queue", "shape", "--by", "queue", "--redis-url", redis_url])
    assert shown.exit_code == 0, shown.output
    header = shown.output.splitlines()[0].split()
    assert header == ["Queue", *COLUMNS] and "TOTAL" in shown.output and SUB in shown.output
    as_json = json.loads(runner.invoke(cli, ["queue", "shape", "--json", "--redis-url", redis_url]).output)
    assert as_json[0]["destination"] == "TOTAL" and as_json[0]["T"] == 6
    refused = runner.invoke(cli, ["queue", "shape", "--by", "size", "--redis-url", redis_url])
    assert refused.exit_code == 2 and "'size' is not one of" in refused.output


def test_counted_in_chunks_the_same_with_odd_recipients(backlog: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailyard import keys
    from mailyard.hub import queue_shape

    whole = [(r.destination, counts(r)) for r in shape(backlog, by="domain", now_ms=NOW)]
    monkeypatch.setattr(queue_shape, "BATCH", 2)  # (three calls for the six items)
    assert [(r.destination, counts(r)) for r in shape(backlog, by="domain", now_ms=NOW)] == whole
    # An item whose recipients cannot be read, one with none, and an upper-case domain
    members = [m.decode() for m in backlog.zrange(keys.queue_members(SUB), 0, -1)]
    backlog.hset(keys.item(members[0]), "rcpts", "not json")
    backlog.hset(keys.item(members[1]), "rcpts", "[]")
    backlog.hset(keys.item(members[2]), "rcpts", json.dumps([{"address": "Bob@CONTOSO.com"}, {"address": "postmaster"}]))
    rows = {r.destination: counts(r)["T"] for r in shape(backlog, by="domain", now_ms=NOW)[1:]}
    assert rows["(unreadable)"] == 1 and rows["(none)"] == 1 and rows["postmaster"] == 1, rows
    assert rows["contoso.com"] == 4, rows
