"""Celery wiring shared by every role: the app, its settings, task names and queues.

Celery moves only references: "this Outbox item is waiting" (pickup) and "this mail queue
has work" (drain). Losing or repeating one of these messages is harmless by design: the
truth is in Redis (mailyard.keys) and the sweeper re-sends whatever went missing.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from typing import Any

import redis
import redis.sentinel
from celery import Celery
from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis

from mailyard import durability, keys, redisconn

TASK_PICKUP = "mailyard.pickup"
TASK_DRAIN = "mailyard.drain"

# Longer than any task: a drain task stops taking new batches after DRAIN_BUDGET seconds.
VISIBILITY_TIMEOUT = 600
DRAIN_BUDGET = 20.0
# How long a kick marker lives unless a running drain renews it: a drain task that was lost
# (or whose worker died) is re-sent by the sweeper after this.
KICK_TTL_MS = 10_000


def hub_queue(hub: str) -> str:
    """The Celery queue only one hub consumes: pickup notifications of the round robin."""
    return f"hub.{hub}"


def site_queue(site: str) -> str:
    """The Celery queue every hub of a site consumes: drain tasks of the site's mail queues."""
    return f"site.{site}"


class WritesRefused(redis.ConnectionError):
    """A primary that refuses writes (NOREPLICAS: no replica connected, min-replicas-to-write),
    as Celery's connections report it. Redis answers a worker's BRPOP, its acks, its queue
    bindings and kombu's restore lock with an error reply, which kombu counts as a channel
    error and Celery as unrecoverable: the worker would exit. It is a connection that cannot
    serve for now, so it says "connection error": the client disconnects, and Celery
    reconnects with its back-off. A refused ack leaves the message in kombu's unacked index,
    restored after the visibility timeout: a drain or pickup message repeated is harmless
    (see above). Other error replies (WRONGTYPE, NOPERM...) stay what they are."""


class _RefusalsLoseTheConnection:
    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError as exc:
            if durability.unreplicated(exc) is None:
                raise
            raise WritesRefused(f"Redis refuses writes: {exc}") from exc


class _Connection(_RefusalsLoseTheConnection, redis.Connection):
    pass


class _SSLConnection(_RefusalsLoseTheConnection, redis.SSLConnection):
    pass


class _SentinelManagedConnection(_RefusalsLoseTheConnection, redis.sentinel.SentinelManagedConnection):
    pass


class _SentinelManagedSSLConnection(_RefusalsLoseTheConnection, kombu_redis.SentinelManagedSSLConnection):
    pass


class _QoS(kombu_redis.QoS):
    def restore_visible(self, *args: Any, **kwargs: Any) -> Any:
        # Run when a consumer connects (where an error would leave the connection half made,
        # open), and every few seconds after: nothing can be restored while writes are
        # refused, and the next pass once they are taken again will.
        try:
            return super().restore_visible(*args, **kwargs)
        except WritesRefused:
            return None


class _Channel(kombu_redis.Channel):
    QoS = _QoS
    connection_class = _Connection
    connection_class_ssl = _SSLConnection


class _SentinelChannel(kombu_redis.SentinelChannel):
    QoS = _QoS
    connection_class = _SentinelManagedConnection
    connection_class_ssl = _SentinelManagedSSLConnection

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # Celery 5.7 handles a lost broker connection by collecting it (which detaches the
        # transport from its connection: ``client`` is None) and then closing it; when that
        # close requeues the messages still unacked, kombu builds a new pool from ``client``
        # and fails with an AttributeError that Celery calls unrecoverable: the hub exits at
        # the primary's loss. Say "connection error" instead, which the close ignores; those
        # messages stay in kombu's unacked index, restored after the visibility timeout (and
        # a drain or pickup message lost or repeated is harmless, see the module's docstring).
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection was closed")
        params: dict[str, Any] = super()._connparams(asynchronous)
        return params


class RedisTransport(kombu_redis.Transport):
    Channel = _Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = _SentinelChannel


# kombu picks the transport by the URL's scheme (at every failover to the next Sentinel's URL
# too): these schemes mean the classes above in every Mailyard process.
kombu_transport.TRANSPORT_ALIASES.update({
    "redis": "mailyard.broker:RedisTransport",
    "rediss": "mailyard.broker:RedisTransport",
    "sentinel": "mailyard.broker:SentinelTransport",
})


def make_app(redis_url: str) -> Celery:
    transport: dict[str, Any] = {}
    if redisconn.is_sentinel(redis_url):
        # kombu's own Sentinel transport: the same Sentinels, the primary by its service name.
        s = redisconn.parse_sentinel(redis_url)
        redis_url = s.kombu_url()
        transport = {"master_name": s.service, "sentinel_kwargs": s.sentinel_kwargs()}
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
            **transport,
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        # A lost broker connection is not the message's fault: a task keeps running on its
        # own Redis connection (whose errors the runner does not count as crashes). Celery
        # terminating its pool child instead would count a crash against the message held,
        # and two partitions would send good mail to Poison. The message is redelivered
        # anyway (it cannot be acked on the new channel); queue leases make that harmless.
        worker_cancel_long_running_tasks_on_connection_loss=False,
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



class DrainMessages:
    """Drain-task messages for Celery, built here and pushed by the transaction that makes a
    queue non-empty (the ``@kick`` operation of core/lua/txn.lua), so that enqueueing a
    message and asking for its drain are one atomic step and one round trip.

    kombu's publish costs more CPU than the rest of an SMTP transaction (measured: about
    0.6 ms). So it runs once per process, into a capturing channel, to learn the message's
    shape; after that only the ids, the argument and the routing key change.
    """

    ttl_ms = KICK_TTL_MS

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._template: str | None = None

    def _capture(self) -> str:
        captured: dict[str, Any] = {}
        with self.app.connection_for_write() as conn:
            producer = self.app.amqp.Producer(conn)

            def put(queue: str, message: dict[str, Any], **_: Any) -> None:
                captured["message"] = message

            producer.channel._put = put
            self.app.send_task(TASK_DRAIN, args=["-"], queue="-", producer=producer)
        m = captured["message"]
        m["headers"].update(id="@ID@", root_id="@ID@", argsrepr="@REPR@")
        m["properties"].update(correlation_id="@ID@", delivery_tag="@TAG@",
                               delivery_info={"exchange": "", "routing_key": "@ROUTE@"})
        m["body"] = "@BODY@"
        return json.dumps(m)

    def build(self, queue: str, celery_queue: str) -> tuple[str, bytes]:
        """(the Redis list kombu reads for ``celery_queue``, the message to LPUSH onto it)."""
        if self._template is None:
            self._template = self._capture()
        task_id = str(uuid.UUID(bytes=os.urandom(16), version=4))
        body = json.dumps([[queue], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
        text = (self._template.replace("@ID@", task_id).replace("@TAG@", os.urandom(16).hex())
                .replace("@ROUTE@", json.dumps(celery_queue)[1:-1]).replace("@REPR@", json.dumps(repr([queue]))[1:-1])
                .replace("@BODY@", base64.b64encode(body.encode()).decode()))
        return keys.CELERY_PREFIX + celery_queue, text.encode()
