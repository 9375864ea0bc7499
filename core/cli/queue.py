"""``mailyard queue``: Get-Queue, Get-Message and the queue actions, across every hub."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click
import redis

from mailyard.cli.common import (
    connect,
    handle_errors,
    json_option,
    print_json,
    redis_option,
    resolve_redis_url,
    table,
)


@click.group()
def queue() -> None:
    """Mail queues on every hub (the Queue Viewer's view): list, messages, suspend, resume, retry."""


def _when(value: object) -> str:
    return str(value).replace("T", " ").rstrip("Z") if value else ""


def print_outcome(outcome, as_json: bool, what: str) -> None:
    """The result of an action: a line per object, then the count; exit 1 if anything failed."""
    if as_json:
        print_json(outcome.as_dict())
    else:
        for done in outcome.done:
            click.echo(f"{done.identity}: {done.result}")
        click.echo(f"{len(outcome.done)} {what}(s) affected")
    for identity, error in outcome.failed:
        click.echo(f"error: {identity}: {error}", err=True)
    if outcome.failed:
        raise SystemExit(1)


@queue.command(name="list")
@click.option("--server", help="Only the queues of this hub's site.")
@click.option("--filter", "filter_", metavar="EXPR", help="e.g. \"Status -eq Retry -and MessageCount -gt 10\".")
@click.option("--sort", metavar="FIELDS", help="e.g. -MessageCount,Identity (- for descending).")
@click.option("--watch", is_flag=True, help="Refresh in place, like top, until Ctrl-C.")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(0.2, 3600),
              help="Seconds between refreshes with --watch.")
@redis_option
@json_option
@handle_errors
def list_(server: str | None, filter_: str | None, sort: str | None, watch: bool, interval: float,
          redis_url: str | None, data_dir: Path, as_json: bool) -> None:
    """Every queue: identity, delivery type, status, message count, next hop, retry times, last error."""
    from mailyard.hub.queue_rows import queue_rows

    r = connect(redis_url, data_dir)

    def render() -> str:
        rows = queue_rows(r, server=server, filter=filter_, sort=sort)
        return table(
            [(q["identity"], q["delivery_type"], q["status"], q["message_count"], q["next_hop_domain"],
              _when(q["last_retry_time"]), _when(q["next_retry_time"]), q["last_error"][:80]) for q in rows],
            ["Identity", "DeliveryType", "Status", "MessageCount", "NextHopDomain", "LastRetryTime",
             "NextRetryTime", "LastError"])

    if watch:
        if as_json:
            raise click.UsageError("--watch shows a table: leave out --json")
        _watch(render, interval)
        return
    if as_json:
        print_json(queue_rows(r, server=server, filter=filter_, sort=sort))
        return
    click.echo(render())


def _watch(render: Callable[[], str], interval: float) -> None:
    """Redraw ``render()`` in place every ``interval`` seconds until Ctrl-C; a Redis that does
    not answer is shown as such, and the next refresh tries again."""
    import shutil
    import time

    from mailyard.errors import MailyardError

    click.echo("\x1b[?1049h", nl=False)  # (the terminal's alternate screen, as top: restored at the end)
    try:
        while True:
            try:
                body = render()
            except (MailyardError, redis.RedisError, OSError) as exc:
                body = f"error: {exc} (trying again in {interval:g} s)"
            width, height = shutil.get_terminal_size()
            title = f"Every {interval:g} s: mailyard queue list"
            lines = [title + time.strftime("%Y-%m-%d %H:%M:%S").rjust(max(0, width - len(title))), "",
                     *body.splitlines()][:max(1, height - 1)]
            # home, each line cleared to its end, then the rest of the screen: no flicker
            click.echo("\x1b[H" + "".join(line[:width] + "\x1b[K\n" for line in lines) + "\x1b[J", nl=False)
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("\x1b[?1049l", nl=False)


@queue.command()
@click.option("--by", type=click.Choice(["queue", "domain", "sender"]), default="queue", show_default=True,
              help="Rows per queue (its next hop: a domain, a mailbox server, a site; instant at any size), per "
                   "recipient domain or per sender domain (these read every queued item).")
@redis_option
@json_option
@handle_errors
def shape(by: str, redis_url: str | None, data_dir: Path, as_json: bool) -> None:
    """Queued messages by age, per destination (Postfix's qshape): T, then up to 5, 10, 20 ...
    1280 minutes in the queue, and 1280+."""
    import time

    from mailyard.hub.queue_shape import COLUMNS
    from mailyard.hub.queue_shape import shape as queue_shape

    rows = queue_shape(connect(redis_url, data_dir), by=by, now_ms=int(time.time() * 1000))
    if as_json:
        print_json([row.as_dict() for row in rows])
        return
    click.echo(table([(row.destination, row.total, *row.counts) for row in rows], [by.capitalize(), *COLUMNS]))


@queue.command()
@click.argument("queue_identity", metavar="[QUEUE]", required=False)
@click.option("--filter", "filter_", metavar="EXPR", help="e.g. \"FromAddress -like '*@contoso.com'\".")
@click.option("--sort", metavar="FIELDS", help="e.g. -Size,DateReceived.")
@click.option("--limit", default=1000, show_default=True, help="At most this many messages.")
@redis_option
@json_option
@handle_errors
def messages(queue_identity: str | None, filter_: str | None, sort: str | None, limit: int,
             redis_url: str | None, data_dir: Path, as_json: bool) -> None:
    """The messages in QUEUE (every queue without it): Get-Message, with each recipient's state."""
    from mailyard.hub.queue_rows import message_rows

    rows = message_rows(connect(redis_url, data_dir), queues=[queue_identity] if queue_identity else None,
                        filter=filter_, sort=sort, limit=limit)
    if as_json:
        print_json(rows)
        return
    click.echo(table(
        [(m["identity"], m["from_address"] or "<>", m["status"], m["size"], _when(m["date_received"]),
          m["retry_count"], m["subject"][:40],
          "; ".join(f"{r['address']} {r['status']}" for r in m["recipients"])[:60], m["last_error"][:60])
         for m in rows],
        ["Identity", "FromAddress", "Status", "Size", "DateReceived", "RetryCount", "Subject", "Recipients",
         "LastError"]))


def _targets(r, identity: str | None, filter_: str | None) -> list[str]:
    from mailyard.hub.queue_rows import queue_rows

    if bool(identity) == bool(filter_):
        raise click.UsageError("give a QUEUE or --filter EXPR (exactly one)")
    if identity:
        return [identity]
    return [q["identity"] for q in queue_rows(r, filter=filter_)]


def _run(action: str, queue_identity: str | None, filter_: str | None, redis_url: str | None,
         data_dir: Path, as_json: bool, **kw: bool) -> None:
    from mailyard.hub.queue_actions import act_on_queues, admin_node

    r = connect(redis_url, data_dir)
    node = admin_node(resolve_redis_url(redis_url, data_dir))
    print_outcome(act_on_queues(node, action, _targets(r, queue_identity, filter_), **kw), as_json, "queue")


_queue_arg = click.argument("queue_identity", metavar="[QUEUE]", required=False)
_filter_opt = click.option("--filter", "filter_", metavar="EXPR", help="Act on every queue that matches.")


@queue.command()
@_queue_arg
@_filter_opt
@redis_option
@json_option
@handle_errors
def suspend(queue_identity: str | None, filter_: str | None, redis_url: str | None, data_dir: Path,
            as_json: bool) -> None:
    """Stop a queue: no more messages leave it (those being delivered finish)."""
    _run("suspend", queue_identity, filter_, redis_url, data_dir, as_json)


@queue.command()
@_queue_arg
@_filter_opt
@redis_option
@json_option
@handle_errors
def resume(queue_identity: str | None, filter_: str | None, redis_url: str | None, data_dir: Path,
           as_json: bool) -> None:
    """Let a suspended queue deliver again."""
    _run("resume", queue_identity, filter_, redis_url, data_dir, as_json)


@queue.command()
@_queue_arg
@_filter_opt
@click.option("--resubmit", is_flag=True, help="Re-route the messages (needed for the Unreachable queue).")
@redis_option
@json_option
@handle_errors
def retry(queue_identity: str | None, filter_: str | None, resubmit: bool, redis_url: str | None,
          data_dir: Path, as_json: bool) -> None:
    """Connect to the next hop now; --resubmit sends the messages back through the categorizer."""
    _run("retry", queue_identity, filter_, redis_url, data_dir, as_json, resubmit=resubmit)
