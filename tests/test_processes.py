"""What every Mailyard process does the same way (mailyard.processes): here, how a retry loop's
log stays readable."""

from __future__ import annotations

import logging

import pytest

from mailyard import processes


def record(text: str, level: int = logging.ERROR, name: str = "celery.worker.consumer.consumer") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, text, None, None)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(processes.time, "monotonic", lambda: now[0])
    return now


def test_a_message_repeated_within_the_window_is_let_through_once_then_with_a_count(clock: list[float]) -> None:
    repeats = processes.Repeats(30.0)
    line = "consumer: Cannot connect to redis://:**@redis:6379/0: NOREPLICAS Not enough good replicas.\nTrying again"
    assert repeats.filter(record(line))
    assert [repeats.filter(record(line)) for _ in range(50)] == [False] * 50
    clock[0] += 31
    again = record(line)
    assert repeats.filter(again)
    assert again.getMessage() == f"{line} (50 more like it in the last 31 s)"


def test_different_messages_levels_and_loggers_are_each_their_own(clock: list[float]) -> None:
    repeats = processes.Repeats(30.0)
    assert repeats.filter(record("a"))
    assert repeats.filter(record("b"))
    assert repeats.filter(record("a", logging.WARNING))
    assert repeats.filter(record("a", name="mailyard.hub.sweeper"))
    assert not repeats.filter(record("a"))


def test_a_message_after_a_quiet_window_has_no_count(clock: list[float]) -> None:
    repeats = processes.Repeats(30.0)
    assert repeats.filter(record("sweeper pass failed"))
    clock[0] += 60
    later = record("sweeper pass failed")
    assert repeats.filter(later) and later.getMessage() == "sweeper pass failed"


def test_the_same_words_with_another_exception_are_another_message(clock: list[float]) -> None:
    repeats = processes.Repeats(30.0)

    def failed(error: BaseException) -> logging.LogRecord:
        r = record("sweeper pass failed; trying again", name="mailyard.hub.sweeper")
        r.exc_info = (type(error), error, None)
        return r
    assert repeats.filter(failed(KeyError("x")))
    assert repeats.filter(failed(ValueError("y")))
    assert not repeats.filter(failed(ValueError("z")))


def test_a_count_goes_on_the_messages_last_line_not_a_line_of_its_own(clock: list[float]) -> None:
    repeats = processes.Repeats(30.0)
    line = "consumer: Cannot connect to redis://:**@redis:6379/0: NOREPLICAS.\nTrying to reconnect...\n"
    repeats.filter(record(line))
    repeats.filter(record(line))
    clock[0] += 30
    again = record(line)
    assert repeats.filter(again)
    assert again.getMessage().endswith("Trying to reconnect... (1 more like it in the last 30 s)"), again.getMessage()
