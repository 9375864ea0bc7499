"""Redis connections and the typed reading of their replies (mailyard.redisconn): clients
that do not decode (message bodies are bytes), and helpers that turn each kind of reply into
what the caller knows it is. The helpers are pure; the last tests read real replies."""

from __future__ import annotations

import asyncio
import re

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


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:s3cret@127.0.0.1:6379/0", "redis://:**@127.0.0.1:6379/0"),
    ("redis://user:s3cret@host:1/2", "redis://user:**@host:1/2"),
    ("rediss://:a%40s3cret@host:6380", "rediss://:**@host:6380"),
    ("unix://:s3cret@/run/redis.sock?db=1", "unix://:**@/run/redis.sock?db=1"),
    ("redis://host:1/0?password=s3cret&db=2", "redis://host:1/0?password=**&db=2"),
])
def test_a_url_is_shown_with_its_password_masked(url: str, shown: str) -> None:
    assert redisconn.redacted(url) == shown and "s3cret" not in redisconn.redacted(url)
    assert "s3cret" not in redisconn.without_password(url) and not redisconn.has_password(redisconn.without_password(url))


def test_a_password_goes_into_a_url_that_has_none_quoted_as_redis_py_reads_it() -> None:
    url = redisconn.with_password("redis://127.0.0.1:6379/0", "p@ss/word")
    assert url == "redis://:p%40ss%2Fword@127.0.0.1:6379/0"
    assert redisconn.password_of(url) == "p@ss/word"
    assert redisconn.with_password("redis://user@h/0", "pw") == "redis://user:pw@h/0"
    assert redisconn.with_password("redis://:mine@h/0", "other") == "redis://:mine@h/0", "a URL's own password wins"
    assert redisconn.password_of("redis://h/0") is None


def test_the_password_file_fills_in_a_url_without_password(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailyard.errors import SiteError

    secret = tmp_path / "password"
    secret.write_text("from-the-file\n")
    monkeypatch.setenv(redisconn.ENV_PASSWORD_FILE, str(secret))
    monkeypatch.setenv(redisconn.ENV_URL, "redis://redis:6379/0")
    assert redisconn.url_from_env() == "redis://:from-the-file@redis:6379/0"
    assert redisconn.with_password_file("redis://:own@redis:6379/0") == "redis://:own@redis:6379/0"
    secret.unlink()
    with pytest.raises(SiteError, match="cannot read the Redis password file"):
        redisconn.url_from_env()


# endregion

# region: real connections


def test_url_from_env_reads_mailyard_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(redisconn.ENV_URL, raising=False)
    monkeypatch.delenv(redisconn.ENV_PASSWORD_FILE, raising=False)
    assert redisconn.url_from_env() is None
    assert redisconn.url_from_env("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    monkeypatch.setenv(redisconn.ENV_URL, "redis://127.0.0.1:7000/3")
    assert redisconn.url_from_env("ignored") == "redis://127.0.0.1:7000/3"


def test_a_refused_logon_fails_at_once_with_a_message_that_masks_the_url(redis_server) -> None:
    import time

    import redis

    wrong = redisconn.with_password(redis_server.url(password=False), "not-it")
    started = time.monotonic()
    with pytest.raises(redis.AuthenticationError) as refused:
        redisconn.connect(wrong).ping()
    assert time.monotonic() - started < 2, "a refused logon is not retried"
    message = redisconn.refused(wrong, refused.value)
    assert "wrong password" in message and "not-it" not in message and "redis://:**@" in message
    with pytest.raises(redis.AuthenticationError) as refused:
        redisconn.connect(redis_server.url(password=False)).ping()
    assert "requires a password" in redisconn.refused(redis_server.url(password=False), refused.value)


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


# region: Sentinel URLs


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database() -> None:
    s = redisconn.parse_sentinel("redis+sentinel://:p%40ss@10.0.0.1:26380,[::1],h3/mailyard/2")
    assert s.sentinels == (("10.0.0.1", 26380), ("::1", 26379), ("h3", 26379)), "26379 is Sentinel's port"
    assert (s.service, s.db, s.password, s.username) == ("mailyard", 2, "p@ss", None)
    assert redisconn.is_sentinel("REDIS+SENTINEL://h/s") and not redisconn.is_sentinel("redis://h:6379/0")


def test_a_sentinel_url_without_a_database_is_database_0() -> None:
    assert redisconn.parse_sentinel("redis+sentinel://h1:1,h2:2/svc").db == 0


@pytest.mark.parametrize(("url", "names"), [
    ("redis+sentinel://h1:1,h2:2", "names the monitored primary"),
    ("redis+sentinel://h1:1/svc/zero", "is a number"),
    ("redis+sentinel://h1:1/svc/0/extra", "/SERVICE or /SERVICE/DB"),
    ("redis+sentinel://h1:x/svc", "bad port"),
    ("redis+sentinel://h1:70000/svc", "bad port"),
    ("redis+sentinel://h1:1,,h2/svc", "empty Sentinel address"),
    ("redis+sentinel://::1:5/svc", "[IPv6]:port"),
])
def test_a_bad_sentinel_url_is_refused_naming_what_is_wrong(url: str, names: str) -> None:
    from mailyard.errors import SiteError
    with pytest.raises(SiteError, match=re.escape(names)):
        redisconn.parse_sentinel(url)


def test_a_refused_sentinel_url_does_not_show_its_password() -> None:
    from mailyard.errors import SiteError
    with pytest.raises(SiteError) as caught:
        redisconn.parse_sentinel("redis+sentinel://:hunter2@h1:1/svc/x")
    assert "hunter2" not in str(caught.value) and ":**@" in str(caught.value)


def test_sentinel_url_builds_what_parse_sentinel_reads_and_the_password_helpers_work_on_it() -> None:
    url = redisconn.sentinel_url([("127.0.0.1", 1), ("::1", 2)], "my service", 3, "a b/c")
    s = redisconn.parse_sentinel(url)
    assert s.sentinels == (("127.0.0.1", 1), ("::1", 2)) and (s.service, s.db, s.password) == ("my service", 3, "a b/c")
    bare = redisconn.without_password(url)
    assert not redisconn.has_password(bare) and redisconn.with_password(bare, "a b/c") == url
    assert redisconn.redacted(url) == "redis+sentinel://:**@127.0.0.1:1,[::1]:2/my%20service/3"


def test_kombu_gets_the_same_sentinels_in_its_own_form() -> None:
    s = redisconn.parse_sentinel("redis+sentinel://:p%40ss@h1:1,h2:2/svc/4")
    assert s.kombu_url() == "sentinel://:p%40ss@h1:1/4;sentinel://:p%40ss@h2:2/4"
    assert s.sentinel_kwargs()["password"] == "p@ss", "the Sentinels ask for the same password"


def test_celery_is_configured_for_kombus_sentinel_transport() -> None:
    from mailyard.broker import make_app
    app = make_app("redis+sentinel://:pw@h1:1,h2:2/svc/0")
    options = app.conf.broker_transport_options
    assert app.conf.broker_url.startswith("sentinel://:pw@h1:1/0;")
    assert options["master_name"] == "svc" and options["sentinel_kwargs"]["password"] == "pw"
    assert options["global_keyprefix"], "the key prefix stays"


# endregion
