"""``mailyard flower``: run Flower, Celery's monitor, for the site's hubs."""

from __future__ import annotations

import os
from pathlib import Path

import click

from mailyard.cli.common import connect, handle_errors, redis_option, resolve_redis_url
from mailyard.cli.viewer import _is_loopback
from mailyard.errors import SiteError

UNAUTHENTICATED_API = "FLOWER_UNAUTHENTICATED_API"
BASIC_AUTH = "FLOWER_BASIC_AUTH"


@click.command()
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=5555, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--purge-offline-workers", default=60, show_default=True, type=click.IntRange(0), metavar="SECONDS",
              help="Hide a hub that has been offline this long (a removed container); 0 keeps them all.")
@click.option("--unauthenticated-api/--no-unauthenticated-api", default=False,
              help="Serve Flower's REST API without authentication (never by default).")
@click.option("--secrets-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Log on with the [flower] user and password kept in DIR/secrets.toml (mode 0600), "
                   "generated on the first start (docker compose uses this; `site up` passes its own).")
@redis_option
@handle_errors
def flower(address: str, port: int, purge_offline_workers: int, unauthenticated_api: bool,
           secrets_dir: Path | None, redis_url: str | None, data_dir: Path) -> None:
    """Run Flower for the site: every hub node (hub@<name>), its tasks and the Celery queues.

    Its pages and REST API (which can also send tasks and stop hubs) are behind basic auth:
    --secrets-dir keeps a generated logon, or set FLOWER_BASIC_AUTH=user:password. Without a
    logon it listens on loopback only, with its REST API off (even a page of another site can
    POST to a loopback port) unless --unauthenticated-api says otherwise.
    """
    connect(redis_url, data_dir)  # a clear error now rather than a stack trace from Flower
    if secrets_dir is not None:
        from mailyard.site import secrets as site_secrets

        kept = site_secrets.ensure(secrets_dir, skip={"redis", "operator", "viewer"})  # (only its own)
        os.environ[BASIC_AUTH] = kept.flower_basic_auth
        click.echo(f"Flower logon: {kept.path} [flower]")
    if not os.environ.get(BASIC_AUTH) and not _is_loopback(address):
        raise SiteError(f"Flower shows every task and its API can stop hubs: on {address}, which is not a "
                        f"loopback address, it needs a logon (--secrets-dir, or {BASIC_AUTH}=user:password)")
    url = resolve_redis_url(redis_url, data_dir)
    os.environ[UNAUTHENTICATED_API] = "true" if unauthenticated_api else "false"
    if unauthenticated_api:
        click.echo(f"warning: Flower's REST API is open to anyone (and any web page) that reaches {address}:{port}",
                   err=True)

    from mailyard.broker import make_app
    from mailyard.flower import harden

    harden()
    argv = ["flower", f"--address={address}", f"--port={port}"]
    if purge_offline_workers:
        argv.append(f"--purge_offline_workers={purge_offline_workers}")
    raise SystemExit(make_app(url).start(argv) or 0)
