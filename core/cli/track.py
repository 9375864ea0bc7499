"""``mailyard track``: search the message tracking log (Get-MessageTrackingLog)."""

from __future__ import annotations

from pathlib import Path

import click

from mailyard import tracking
from mailyard.cli.common import connect, handle_errors, json_option, print_json, redis_option, table


class TrackingTime(click.ParamType):
    """A --start or --end: checked before anything connects, so a bad one is a usage error."""

    name = "TIME"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):  # (already converted)
            return value
        try:
            return tracking.parse_time(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.command()
@click.option("--message-id", help="Internet Message-ID (with or without <>).")
@click.option("--internal-id", help="Mailyard's internal message id.")
@click.option("--sender", help="Envelope sender.")
@click.option("--recipient", help="A recipient address.")
@click.option("--event", type=click.Choice([e.value for e in tracking.Event], case_sensitive=False))
@click.option("--start", type=TrackingTime(), help="From this time (ISO 8601, UTC unless it says otherwise).")
@click.option("--end", type=TrackingTime(), help="Before this time (exclusive).")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1))
@redis_option
@json_option
@handle_errors
def track(message_id: str | None, internal_id: str | None, sender: str | None, recipient: str | None,
          event: str | None, start: int | None, end: int | None, limit: int, redis_url: str | None,
          data_dir: Path, as_json: bool) -> None:
    """Search tracking events across the site, oldest first: a message's whole path."""
    records = tracking.search(
        connect(redis_url, data_dir), message_id=message_id, internal_id=internal_id, sender=sender,
        recipient=recipient, event=event, start_ms=start, end_ms=end, limit=limit,
    )
    if as_json:
        print_json([r.as_dict() for r in records])
        return
    click.echo(table(
        [(r.as_dict()["time"], r.event, r.source, r.server, r.internal_id, r.sender or "<>",
          ";".join(r.recipients), ";".join(r.recipient_status)[:60], r.related, r.subject[:30])
         for r in records],
        ["Timestamp", "EventId", "Source", "Server", "InternalId", "Sender", "Recipients",
         "RecipientStatus", "Related", "Subject"]))
