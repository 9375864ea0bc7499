"""``mailyard hub``: run a hub transport node; ``mailyard hub list``: the hubs of every site."""

from __future__ import annotations

from pathlib import Path

import click

from mailyard.cli.common import connect, handle_errors, json_option, print_json, redis_option, resolve_redis_url, table
from mailyard.errors import SiteError
from mailyard.orgstore import read_org
from mailyard.processes import setup_logging


@click.group(invoke_without_command=True, subcommand_metavar="[list]")
@click.option("--site", "site_name", help="The site this hub serves (required to run one).")
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
@click.pass_context
@handle_errors
def hub(ctx: click.Context, site_name: str | None, name: str | None, concurrency: int, pool: str, loglevel: str,
        receive: bool, binds: tuple[str, ...], check: bool, redis_url: str | None, data_dir: Path) -> None:
    """Run a hub transport node: store driver, categorizer, delivery, sweeper
    (mailyard hub --site S); mailyard hub list shows the hubs of every site."""
    if ctx.invoked_subcommand is not None:
        return
    if site_name is None:
        raise click.UsageError("Missing option '--site' (the site the hub serves), or a command: list")
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



@hub.command("list")
@json_option
@redis_option
@handle_errors
def list_hubs(as_json: bool, redis_url: str | None, data_dir: Path) -> None:
    """The hubs of every site (Get-TransportServer): alive or not, version, concurrency,
    their site's back pressure, where their receive connectors listen."""
    from mailyard.errors import MailyardError
    from mailyard.hub.hub_list import DEFAULT_HEARTBEAT_TIMEOUT_S, hub_rows

    r = connect(redis_url, data_dir)
    try:
        timeout_s = float(read_org(r)[1].transport.hub_heartbeat_timeout)
    except MailyardError:  # (no organization applied yet: the default)
        timeout_s = DEFAULT_HEARTBEAT_TIMEOUT_S
    rows = hub_rows(r, timeout_s)
    if as_json:
        print_json(rows)
        return
    if not rows:
        click.echo("no hub has started (mailyard hub --site S, or mailyard site up)")
        return
    click.echo(table(
        [[h["name"], h["site"], "alive" if h["alive"] else f"dead ({h['heartbeat_age_seconds']:g} s silent)",
          h["version"], h["concurrency"] or "", h["back_pressure"] + (f" ({', '.join(h['under_pressure'])})"
                                                                     if h["under_pressure"] else ""),
          h["host"], h["pid"], (h["started"] or "").replace("T", " ").rstrip("Z"),
          ", ".join(f"{c} {a}" for c, a in sorted(h["endpoints"].items()))]
         for h in rows],
        ["Name", "Site", "State", "Version", "Concurrency", "Back pressure", "Host", "PID", "Started",
         "Receive connectors"]))
