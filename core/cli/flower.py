"""``mailyard flower``: run Flower, Celery's monitor, for the site's hubs."""

from __future__ import annotations

import os
from pathlib import Path

import click

from mailyard.cli.common import connect, handle_errors, redis_option, resolve_redis_url
from mailyard.cli.viewer import _is_loopback

UNAUTHENTICATED_API = "FLOWER_UNAUTHENTICATED_API"


@click.command()
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=5555, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--purge-offline-workers", default=60, show_default=True, type=click.IntRange(0), metavar="SECONDS",
              help="Hide a hub that has been offline this long (a removed container); 0 keeps them all.")
@click.option("--unauthenticated-api/--no-unauthenticated-api", default=None,
              help="Serve Flower's REST API without authentication [default: only on a loopback address].")
@redis_option
@handle_errors
def flower(address: str, port: int, purge_offline_workers: int, unauthenticated_api: bool | None,
           redis_url: str | None, data_dir: Path) -> None:
    """Run Flower for the site: every hub node (hub@<name>), its tasks and the Celery queues.

    Flower's web pages need no API access. Its REST API (which can also send tasks) is open
    without authentication only where the address is loopback, unless told otherwise; elsewhere
    protect it with Flower's own settings, e.g. FLOWER_BASIC_AUTH=user:password.
    """
    connect(redis_url, data_dir)  # a clear error now rather than a stack trace from Flower
    url = resolve_redis_url(redis_url, data_dir)
    if unauthenticated_api is None:
        if _is_loopback(address):
            os.environ[UNAUTHENTICATED_API] = "true"
    else:
        os.environ[UNAUTHENTICATED_API] = "true" if unauthenticated_api else "false"
        if unauthenticated_api and not _is_loopback(address):
            click.echo(f"warning: Flower's REST API is open to anyone who reaches {address}:{port}", err=True)

    from mailyard.broker import make_app
    from mailyard.flower import logon_for_metrics

    logon_for_metrics()
    argv = ["flower", f"--address={address}", f"--port={port}"]
    if purge_offline_workers:
        argv.append(f"--purge_offline_workers={purge_offline_workers}")
    raise SystemExit(make_app(url).start(argv) or 0)
