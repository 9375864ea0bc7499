"""Redis connections and the typed reading of their replies (mailyard.redisconn): clients
that do not decode (message bodies are bytes), and helpers that turn each kind of reply into
what the caller knows it is. The helpers are pure; the last tests read real replies."""

from __future__ import annotations

import asyncio

import pytest

from mailyard import redisconn
from mailyard.redisconn import flat_text_map, number, scored, text, text_map, text_or_none, texts

# region: the helpers


@pytest.mark.parametrize(("reply", "expected"), [
    (b"Amsterdam\\MBX-AMS-01", "Amsterdam\\MBX-AMS-01"), (bytearray(b"abc"), "abc"), (memoryview(b"mv"), "mv"),
    ("already text", "already text"), (42, "42"), (None, ""), (b"", ""), ("Zo\u00eb".encode(), "Zo\u00eb"),
])
def test_text_reads_a_string_reply_as_utf8_text(reply: object, expected: str) -> None:
    assert text(reply) == expected


def test_text_replaces_bytes_that_are_not_utf8_instead_of_failing() -> None:
    assert text(b"caf\xe9") == "caf\ufffd"


def test_text_or_none_keeps_an_absent_reply_absent() -> None:
    assert text_or_none(None) is None
    assert text_or_none(b"") == "", "an empty string is present"
    assert text_or_none(b"x") == "x"


def test_texts_reads_a_list_reply_and_an_absent_one_as_empty() -> None:
    assert texts([b"a", "b", 3]) == ["a", "b", "3"]
    assert texts(None) == [] and texts([]) == []


def test_text_map_reads_a_hash_reply() -> None:
    assert text_map({b"status": b"Ready", b"retries": b"2"}) == {"status": "Ready", "retries": "2"}
    assert text_map(None) == {} and text_map({}) == {}


def test_flat_text_map_pairs_a_scripts_field_value_list() -> None:
    assert flat_text_map([b"kind", b"Delivery", b"type", b"MapiDelivery"]) == {"kind": "Delivery",
                                                                               "type": "MapiDelivery"}
    assert flat_text_map(None) == {}


def test_flat_text_map_refuses_a_field_without_a_value() -> None:
    with pytest.raises(ValueError):
        flat_text_map([b"kind", b"Delivery", b"type"])


def test_scored_reads_members_with_their_scores_as_floats() -> None:
    assert scored([(b"hub@a", 1764600000000.0), ("hub@b", b"12")]) == [("hub@a", 1764600000000.0), ("hub@b", 12.0)]
    assert scored([]) == []


@pytest.mark.parametrize(("reply", "expected"), [(7, 7), (b"12", 12), ("-3", -3), (None, 0), (b"", 0), ("", 0)])
def test_number_reads_an_integer_reply_or_a_string_holding_one(reply: object, expected: int) -> None:
    assert number(reply) == expected


def test_number_of_an_absent_reply_is_the_callers_default() -> None:
    assert number(None, default=5) == 5 and number(b"", default=-1) == -1
    assert number(b"0", default=5) == 0, "zero is a value, not an absent reply"


def test_number_refuses_what_is_not_an_integer() -> None:
    with pytest.raises(ValueError):
        number(b"1.5")


# endregion

# region: real connections


def test_url_from_env_reads_mailyard_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(redisconn.ENV_URL, raising=False)
    assert redisconn.url_from_env() is None
    assert redisconn.url_from_env("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    monkeypatch.setenv(redisconn.ENV_URL, "redis://127.0.0.1:7000/3")
    assert redisconn.url_from_env("ignored") == "redis://127.0.0.1:7000/3"


def test_a_client_returns_bytes_and_the_helpers_read_them(redis_url: str) -> None:
    r = redisconn.connect(redis_url)
    try:
        r.hset("h", mapping={"subject": "Caf\u00e9", "size": 10})
        r.rpush("l", "a", "b")
        r.zadd("z", {"m": 5})
        raw = r.hgetall("h")
        assert all(isinstance(k, bytes) for k in raw), "replies are not decoded: bodies must stay bytes"
        assert text_map(raw) == {"subject": "Caf\u00e9", "size": "10"}
        assert texts(r.lrange("l", 0, -1)) == ["a", "b"]
        assert scored(r.zrange("z", 0, -1, withscores=True)) == [("m", 5.0)]
        assert number(r.hget("h", "size")) == 10 and number(r.hget("h", "missing")) == 0
        assert text_or_none(r.get("missing")) is None
    finally:
        r.close()


def test_a_client_has_timeouts_and_retries_set(redis_url: str) -> None:
    r = redisconn.connect(redis_url)
    try:
        kwargs = r.connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (15, 5)
        assert kwargs["health_check_interval"] == 10
        assert r.get_retry() is not None and r.get_retry()._retries == 6
    finally:
        r.close()


def test_an_asyncio_client_reads_the_same_way(redis_url: str) -> None:
    async def main() -> dict[str, str]:
        r = redisconn.connect_async(redis_url)
        try:
            await r.hset("h", mapping={"a": "1"})
            return text_map(await r.hgetall("h"))
        finally:
            await r.aclose()

    assert asyncio.run(main()) == {"a": "1"}


# endregion
