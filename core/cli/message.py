"""``mailyard message``: Suspend-Message, Resume-Message, Remove-Message, Export-Message."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mailyard.cli.common import connect, handle_errors, json_option, redis_option, resolve_redis_url
from mailyard.cli.queue import print_outcome


@click.group()
def message() -> None:
    """Messages in queues, one by identity (Site\\Queue\\Id or Id) or in bulk with --filter."""


def _targets(r, identity: str | None, filter_: str | None, queue: str | None) -> list[str]:
    from mailyard.hub.queue_rows import message_rows

    if bool(identity) == bool(filter_):
        raise click.UsageError("give a message IDENTITY or --filter EXPR (exactly one)")
    if identity:
        return [identity]
    rows = message_rows(r, queues=[queue] if queue else None, filter=filter_, limit=250_000)
    return [m["identity"] for m in rows]


def _run(action: str, identity: str | None, filter_: str | None, queue: str | None, redis_url: str | None,
         data_dir: Path, as_json: bool, *, ndr: bool = True, yes: bool = True, wait: float = 0.0) -> None:
    from mailyard.hub.queue_actions import act_on_messages, admin_node

    r = connect(redis_url, data_dir)
    targets = _targets(r, identity, filter_, queue)
    if not yes and filter_ and targets:
        click.confirm(f"Remove {len(targets)} message(s){'' if ndr else ' without NDR'}?", abort=True, err=True)
    node = admin_node(resolve_redis_url(redis_url, data_dir))
    print_outcome(act_on_messages(node, action, targets, ndr=ndr, wait=wait), as_json, "message")


_identity = click.argument("identity", metavar="[IDENTITY]", required=False)
_filter = click.option("--filter", "filter_", metavar="EXPR",
                       help="Act on every message that matches, e.g. \"RecipientDomains -eq fabrikam.example\".")
_queue = click.option("--queue", "queue", metavar="QUEUE", help="With --filter: only this queue.")
_wait = click.option("--wait", "wait", type=click.FloatRange(min=0), default=0.0, metavar="SECONDS",
                     help="For a message being delivered: wait up to SECONDS for the delivery to end and "
                          "say what became of the request (Suspended, Removed, or delivered: too late).")


@message.command()
@_identity
@_filter
@_queue
@_wait
@redis_option
@json_option
@handle_errors
def suspend(identity: str | None, filter_: str | None, queue: str | None, wait: float, redis_url: str | None,
            data_dir: Path, as_json: bool) -> None:
    """Hold messages in their queue (PendingSuspend while one is being delivered)."""
    _run("suspend", identity, filter_, queue, redis_url, data_dir, as_json, wait=wait)


@message.command()
@_identity
@_filter
@_queue
@redis_option
@json_option
@handle_errors
def resume(identity: str | None, filter_: str | None, queue: str | None, redis_url: str | None, data_dir: Path,
           as_json: bool) -> None:
    """Release suspended messages; a Poison message goes back through the categorizer."""
    _run("resume", identity, filter_, queue, redis_url, data_dir, as_json)


@message.command()
@_identity
@_filter
@_queue
@click.option("--without-ndr", is_flag=True, help="Drop silently instead of telling the sender.")
@click.option("--yes", is_flag=True, help="Do not ask before removing in bulk.")
@_wait
@redis_option
@json_option
@handle_errors
def remove(identity: str | None, filter_: str | None, queue: str | None, without_ndr: bool, yes: bool,
           wait: float, redis_url: str | None, data_dir: Path, as_json: bool) -> None:
    """Remove messages, with an NDR to the sender unless --without-ndr (Remove-Message)."""
    _run("remove", identity, filter_, queue, redis_url, data_dir, as_json, ndr=not without_ndr, yes=yes,
         wait=wait)


@message.command()
@click.argument("identity")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to this file.")
@redis_option
@handle_errors
def export(identity: str, output: Path | None, redis_url: str | None, data_dir: Path) -> None:
    """The RFC 5322 text of a suspended (or poison) message (Export-Message)."""
    from mailyard.hub.queue_actions import admin_node, export_message, find_item

    node = admin_node(resolve_redis_url(redis_url, data_dir))
    raw = export_message(node, find_item(node, identity))
    if output:
        output.write_bytes(raw)
        click.echo(f"wrote {len(raw)} bytes to {output}", err=True)
    else:
        sys.stdout.buffer.write(raw)
