"""``mailyard mailbox`` (serve a mailbox server, show a folder) and ``mailyard send``."""

from __future__ import annotations

import sys
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import make_msgid
from pathlib import Path

import click
import redis

from mailyard import headers, pki, registry
from mailyard.cli import logon
from mailyard.cli.common import (
    connect,
    handle_errors,
    json_option,
    print_json,
    redis_option,
    resolve_redis_url,
    table,
)
from mailyard.errors import NotFoundError
from mailyard.orgstore import OrgCache
from mailyard.processes import setup_logging

SEND_RETRY_TIME = 60.0  # seconds `send` asks again for an answer lost on the way (a mailbox server restarting)


@click.group()
def mailbox() -> None:
    """Mailbox servers and their mailboxes."""


@mailbox.command()
@click.option("--server", required=True, help="Name of the mailbox server (from the organization).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=0, show_default=True, help="Port of the HTTP API (0: any free port).")
@click.option("--advertise-url", help="URL hubs and clients use to reach this server.")
@click.option("--loglevel", default="INFO", show_default=True)
@redis_option
@handle_errors
def serve(server: str, host: str, port: int, advertise_url: str | None, loglevel: str,
          redis_url: str | None, data_dir: Path) -> None:
    """Run a mailbox server: its Maildirs, its HTTP API and its Mail Submission Service."""
    from mailyard.mailbox.server import serve as run

    setup_logging(loglevel)
    run(server=server, redis_url=resolve_redis_url(redis_url, data_dir), data_dir=data_dir / "mailboxes",
        pki_dir=pki.pki_dir(data_dir), host=host, port=port, advertise_url=advertise_url)


def mailbox_url(r: redis.Redis, address: str) -> tuple[str, str]:
    """The mailbox's server and its API URL."""
    entry = OrgCache(r).get().mailbox_entry(address)
    if entry is None or entry.server is None:
        raise NotFoundError(f"{address} is not a mailbox of this organization")
    return entry.server, f"{registry.server_url(r, entry.server)}/mailboxes/{entry.address}"


@mailbox.command()
@click.argument("address")
@click.option("--folder", default="Inbox", show_default=True, help="Inbox, Outbox, 'Sent Items' or 'Junk Email'.")
@click.option("--raw", "raw_id", metavar="ID", help="Print one message as RFC 5322 text.")
@logon.logon_options
@redis_option
@json_option
@handle_errors
def show(address: str, folder: str, raw_id: str | None, user: str | None, password_file: Path | None,
         ca_file: Path | None, redis_url: str | None, data_dir: Path, as_json: bool) -> None:
    """List a mailbox folder, or print one message with --raw ID (needs FullAccess on it)."""
    server, base = mailbox_url(connect(redis_url, data_dir), address)
    with logon.resolve(data_dir, user, password_file, ca_file).client() as client:
        if raw_id:
            response = logon.call(client, server, "GET", f"{base}/folders/{folder}/{raw_id}")
            sys.stdout.buffer.write(response.content)
            return
        data = logon.call(client, server, "GET", f"{base}/folders/{folder}").json()
    if as_json:
        print_json(data["items"])
        return
    click.echo(f"{data['mailbox']} / {data['folder']}: {len(data['items'])} message(s)")
    if data["items"]:
        click.echo(table(
            [(i["id"], i["date"][:19].replace("T", " "), i["from"], ", ".join(i["to"]), i["subject"])
             for i in data["items"]],
            ["Id", "Date", "From", "To", "Subject"]))


@click.command()
@click.option("--from", "sender", required=True, help="The sending mailbox.")
@click.option("--to", multiple=True, help="A recipient (repeatable).")
@click.option("--cc", multiple=True, help="A Cc recipient (repeatable).")
@click.option("--bcc", multiple=True, help="A Bcc recipient (repeatable).")
@click.option("--subject", default="", help="The subject line.")
@click.option("--body", help="The message text.")
@click.option("--file", "eml", type=click.Path(dir_okay=False, path_type=Path),
              help="Send this RFC 5322 file (its headers may be completed by --to/--subject).")
@click.option("--message-id", help="The message's Message-ID, <unique@domain> (default: a new one; a "
              "--file keeps its own). Sent again with the same one, it is no new mail.")
@logon.logon_options
@redis_option
@json_option
@handle_errors
def send(sender: str, to: tuple[str, ...], cc: tuple[str, ...], bcc: tuple[str, ...], subject: str,
         body: str | None, eml: Path | None, message_id: str | None, user: str | None,
         password_file: Path | None, ca_file: Path | None, redis_url: str | None, data_dir: Path,
         as_json: bool) -> None:
    """Send a message from a mailbox (needs SendAs or SendOnBehalf on it): it goes into the
    Outbox, a hub picks it up. An answer lost on the way (the connection broke) is asked for
    again for up to a minute: the mailbox stores a Message-ID once, so that is one message."""
    if (body is None) == (eml is None):
        raise click.UsageError("give exactly one of --body and --file")
    if message_id is not None and not (message_id.startswith("<") and message_id.endswith(">")
                                       and "@" in message_id and len(message_id.split()) == 1):
        raise click.UsageError(f"--message-id: expected <unique@domain>, not {message_id!r}")
    message_id = message_id or make_msgid(domain=sender.rpartition("@")[2] or None)
    if eml is not None:
        raw = eml.read_bytes()
        extra = "".join(f"{name}: {', '.join(values)}\r\n"
                        for name, values in (("To", to), ("Cc", cc), ("Bcc", bcc)) if values)
        if subject:
            extra += f"Subject: {subject}\r\n"
        if headers.first_value(raw, "Message-ID") is None:
            extra += f"Message-ID: {message_id}\r\n"
        raw = extra.encode() + raw
    else:
        if not (to or cc or bcc):
            raise click.UsageError("give at least one --to, --cc or --bcc")
        msg = EmailMessage()
        msg["From"] = sender
        for name, values in (("To", to), ("Cc", cc), ("Bcc", bcc)):
            if values:
                msg[name] = ", ".join(values)
        msg["Subject"] = subject
        msg["Message-ID"] = message_id
        msg.set_content(body or "")
        raw = msg.as_bytes(policy=SMTP_POLICY)
    server, base = mailbox_url(connect(redis_url, data_dir), sender)
    with logon.resolve(data_dir, user, password_file, ca_file).client() as client:
        data = logon.call(client, server, "POST", f"{base}/outbox", content=raw, resend_for=SEND_RETRY_TIME,
                          headers={"Content-Type": "message/rfc822"}).json()
    if as_json:
        print_json(data)
    else:
        click.echo(f"queued in the Outbox of {sender} as {data['id']} "
                   f"({data['message_id']}) for {', '.join(data['recipients'])}")


