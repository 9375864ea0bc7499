"""Exchange 2010's retry schedule (mailyard.hub.retry), as pure functions of the transport
settings: after a failed connection the whole queue waits 1 minute four times (glitch
retries), then 5 minutes six times (transient failures), then 10 minutes every time; a
recipient refused with 4xx waits the message retry interval (1 minute)."""

from __future__ import annotations

import pytest

from mailyard.hub.retry import message_retry_delay, queue_retry_delay
from mailyard.org import TransportSettings

EXCHANGE = TransportSettings()


@pytest.mark.parametrize(("failures", "delay"), [
    (1, 60), (2, 60), (3, 60), (4, 60),
    (5, 300), (6, 300), (7, 300), (8, 300), (9, 300), (10, 300),
    (11, 600), (12, 600), (50, 600), (10_000, 600),
])
def test_exchanges_default_schedule_is_4_x_1_minute_then_6_x_5_minutes_then_every_10_minutes(
        failures: int, delay: float) -> None:
    assert queue_retry_delay(EXCHANGE, failures) == delay


def test_the_first_ten_retries_take_34_minutes_altogether() -> None:
    waited = sum(queue_retry_delay(EXCHANGE, n) for n in range(1, 11))
    assert waited == 4 * 60 + 6 * 300 == 2040


def test_the_schedule_follows_the_settings() -> None:
    settings = TransportSettings(queue_glitch_retry_count=2, queue_glitch_retry_interval="10s",
                                 transient_failure_retry_count=1, transient_failure_retry_interval="30s",
                                 outbound_connection_failure_retry_interval="2m")
    assert [queue_retry_delay(settings, n) for n in range(1, 6)] == [10, 10, 30, 120, 120]


def test_without_glitch_retries_the_first_failure_waits_the_transient_interval() -> None:
    settings = TransportSettings(queue_glitch_retry_count=0)
    assert queue_retry_delay(settings, 1) == settings.transient_failure_retry_interval == 300
    assert queue_retry_delay(settings, 7) == settings.outbound_connection_failure_retry_interval == 600


def test_without_glitch_or_transient_retries_every_failure_waits_the_long_interval() -> None:
    settings = TransportSettings(queue_glitch_retry_count=0, transient_failure_retry_count=0)
    assert {queue_retry_delay(settings, n) for n in range(1, 5)} == {600}


def test_the_delay_never_shrinks_as_failures_accumulate() -> None:
    delays = [queue_retry_delay(EXCHANGE, n) for n in range(1, 30)]
    assert delays == sorted(delays)


def test_a_refused_recipient_waits_the_message_retry_interval() -> None:
    assert message_retry_delay(EXCHANGE) == 60
    assert message_retry_delay(TransportSettings(message_retry_interval="15s")) == 15
