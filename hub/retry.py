"""When to try again: Exchange 2010's retry schedule, as pure functions of the settings.

After a failed connection to a next hop the whole queue waits: first
``queue_glitch_retry_count`` glitch retries ``queue_glitch_retry_interval`` apart (4 x 1 min),
then ``transient_failure_retry_count`` retries ``transient_failure_retry_interval`` apart
(6 x 5 min), then every ``outbound_connection_failure_retry_interval`` (10 min), until the
message expires (2 days). A recipient refused with 4xx on a working connection is retried
on its own after ``message_retry_interval`` (1 min).
"""

from __future__ import annotations

from mailyard.org import TransportSettings


def queue_retry_delay(settings: TransportSettings, failures: int) -> float:
    """Seconds until the next attempt after ``failures`` consecutive failed attempts (>= 1)."""
    if failures <= settings.queue_glitch_retry_count:
        return settings.queue_glitch_retry_interval
    if failures <= settings.queue_glitch_retry_count + settings.transient_failure_retry_count:
        return settings.transient_failure_retry_interval
    return settings.outbound_connection_failure_retry_interval


def message_retry_delay(settings: TransportSettings) -> float:
    return settings.message_retry_interval
