"""The ``mailyard`` command."""

from __future__ import annotations

import importlib

import click

from mailyard import __version__

# Each command's module is imported only when that command runs: ``mailyard queue list``
# does not pay for Celery, dnspython and the web servers (measured: 1.1 s -> 0.5 s to start).
COMMANDS = {
    "site": "mailyard.cli.site:site",
    "org": "mailyard.cli.org:org",
    "mailbox": "mailyard.cli.mailbox:mailbox",
    "send": "mailyard.cli.mailbox:send",
    "hub": "mailyard.cli.hub:hub",
    "queue": "mailyard.cli.queue:queue",
    "message": "mailyard.cli.message:message",
    "track": "mailyard.cli.track:track",
    "internet": "mailyard.cli.internet:internet",
    "viewer": "mailyard.cli.viewer:viewer",
    "flower": "mailyard.cli.flower:flower",
    "health": "mailyard.cli.health:health",
    "edge": "mailyard.cli.edge:edge",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attr = COMMANDS[cmd_name].split(":")
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command) and command.name == cmd_name, COMMANDS[cmd_name]
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mailyard")
def cli() -> None:
    """Mailyard: an Exchange-style mail transport cluster on Celery and Redis."""


def main() -> None:
    cli()
