"""``mailyard queue``: Get-Queue and Get-Message across every hub of the organization."""

from __future__ import annotations

from pathlib import Path

import click

from mailyard.cli.common import connect, handle_errors, json_option, print_json, redis_option, table


@click.group()
def queue() -> None:
    """Mail queues on every hub (the Queue Viewer's view)."""


def _when(value: object) -> str:
    return str(value).replace("T", " ").rstrip("Z") if value else ""


@queue.command(name="list")
@redis_option
@json_option
@handle_errors
def list_(redis_url: str | None, data_dir: Path, as_json: bool) -> None:
    """Every queue: identity, delivery type, status, message count, next hop, last error."""
    from mailyard.hub.queues import list_queues

    queues = [q.as_dict() for q in list_queues(connect(redis_url, data_dir))]
    if as_json:
        print_json(queues)
        return
    click.echo(table(
        [(q["identity"], q["delivery_type"], q["status"], q["message_count"], q["next_hop_domain"],
          _when(q["next_retry_time"]), q["last_error"]) for q in queues],
        ["Identity", "DeliveryType", "Status", "MessageCount", "NextHopDomain", "NextRetryTime",
         "LastError"]))


@queue.command()
@click.argument("queue_identity", metavar="QUEUE")
@redis_option
@json_option
@handle_errors
def messages(queue_identity: str, redis_url: str | None, data_dir: Path, as_json: bool) -> None:
    """The messages in QUEUE (Get-Message), e.g. 'Amsterdam\\London'."""
    from mailyard.hub.queueview import queue_messages

    rows = queue_messages(connect(redis_url, data_dir), queue_identity)
    if as_json:
        print_json(rows)
        return
    click.echo(table(
        [(m["identity"], m["from_address"] or "<>", m["status"], m["size"], m["retry_count"],
          m["subject"][:40], "; ".join(f"{r['address']} {r['status']}" for r in m["recipients"]),
          m["last_error"]) for m in rows],
        ["Identity", "FromAddress", "Status", "Size", "RetryCount", "Subject", "Recipients",
         "LastError"]))


