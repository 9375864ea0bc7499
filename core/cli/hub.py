"""``mailyard hub``: run a hub transport node."""

from __future__ import annotations

from pathlib import Path

import click

from mailyard.cli.common import connect, handle_errors, redis_option, resolve_redis_url
from mailyard.errors import SiteError
from mailyard.orgstore import read_org
from mailyard.processes import setup_logging


@click.command()
@click.option("--site", "site_name", required=True, help="The site this hub serves.")
@click.option("--name", help="Node name (default: the host name).")
@click.option("--concurrency", default=2, show_default=True, type=click.IntRange(1, 256),
              help="Worker processes.")
@click.option("--pool", default="prefork", show_default=True,
              type=click.Choice(["prefork", "threads", "solo"]))
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--receive/--no-receive", default=True, show_default=True,
              help="Run the site's receive connectors (SMTP in).")
@click.option("--bind", "binds", multiple=True, metavar="CONFIGURED=HOST:PORT",
              help="Listen on HOST:PORT for connectors bound to CONFIGURED (e.g. 0.0.0.0:25=127.0.0.1:2525).")
@click.option("--check", is_flag=True, help="Check the options and the organization, then exit.")
@redis_option
@handle_errors
def hub(site_name: str, name: str | None, concurrency: int, pool: str, loglevel: str, receive: bool,
        binds: tuple[str, ...], check: bool, redis_url: str | None, data_dir: Path) -> None:
    """Run a hub transport node: store driver, categorizer, delivery, sweeper."""
    from mailyard.hub.node import default_name

    name = name or default_name()
    _, org = read_org(connect(redis_url, data_dir))
    if site_name not in {s.name for s in org.sites}:
        raise SiteError(f"the organization has no site {site_name!r} "
                        f"(sites: {', '.join(s.name for s in org.sites)})")
    from mailyard.hub.receive_listener import parse_binds

    try:
        parse_binds(list(binds))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if check:
        click.echo(f"hub {name} of site {site_name}: ok")
        return
    setup_logging(loglevel)
    from mailyard.hub.app import run

    run(name=name, site=site_name, redis_url=resolve_redis_url(redis_url, data_dir), data_dir=data_dir,
        concurrency=concurrency, pool=pool, loglevel=loglevel, receive=receive, binds=list(binds))

