"""Celery wiring shared by every role: the app, its settings, task names and queues.

Celery moves only references: "this Outbox item is waiting" (pickup) and "this mail queue
has work" (drain). Losing or repeating one of these messages is harmless by design: the
truth is in Redis (mailyard.keys) and the sweeper re-sends whatever went missing.
"""

from __future__ import annotations

from celery import Celery

from mailyard import keys

TASK_PICKUP = "mailyard.pickup"
TASK_DRAIN = "mailyard.drain"

# Longer than any task: a drain task stops taking new batches after DRAIN_BUDGET seconds.
VISIBILITY_TIMEOUT = 600
DRAIN_BUDGET = 20.0
KICK_TTL_MS = 15_000  # a pending drain that never ran is re-sent by the sweeper after this


def hub_queue(hub: str) -> str:
    """The Celery queue only one hub consumes: pickup notifications of the round robin."""
    return f"hub.{hub}"


def site_queue(site: str) -> str:
    """The Celery queue every hub of a site consumes: drain tasks of the site's mail queues."""
    return f"site.{site}"


def make_app(redis_url: str) -> Celery:
    app = Celery("mailyard", broker=redis_url, set_as_current=False)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": VISIBILITY_TIMEOUT,
            "socket_timeout": 15,
            "socket_connect_timeout": 5,
            "socket_keepalive": True,
            "health_check_interval": 10,
            "global_keyprefix": keys.CELERY_PREFIX,
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue="mailyard.default",
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        task_soft_time_limit=240,
        task_time_limit=300,
        worker_enable_remote_control=True,
    )
    return app

