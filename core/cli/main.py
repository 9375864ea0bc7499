"""The ``mailyard`` command."""

from __future__ import annotations

import click

from mailyard import __version__
from mailyard.cli.flower import flower
from mailyard.cli.health import health
from mailyard.cli.hub import hub, receive
from mailyard.cli.internet import internet
from mailyard.cli.mailbox import mailbox, send
from mailyard.cli.message import message
from mailyard.cli.org import org
from mailyard.cli.queue import queue
from mailyard.cli.site import site
from mailyard.cli.track import track
from mailyard.cli.viewer import viewer


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mailyard")
def cli() -> None:
    """Mailyard: an Exchange-style mail transport cluster on Celery and Redis."""


for command in (site, org, mailbox, send, hub, receive, queue, message, track, internet, viewer, flower, health):
    cli.add_command(command)


def main() -> None:
    cli()
