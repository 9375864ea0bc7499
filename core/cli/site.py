"""``mailyard site``: run a whole site on this machine (up), and see it (status)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import click

from mailyard import redisconn, registry
from mailyard.cli.common import (
    data_dir_option,
    handle_errors,
    json_option,
    print_json,
    read_state,
    site_redis_url,
    table,
)
from mailyard.errors import SiteError
from mailyard.org import load_org
from mailyard.processes import process_state, setup_logging
from mailyard.site import ports, replicas
from mailyard.site.redis_group import Layout
from mailyard.site.runner import Site, SiteConfig, _pid_alive

DEFAULT_CONFIG = Path("deploy/contoso.toml")


@click.group()
def site() -> None:
    """The local site: every process of an organization on this machine."""


@site.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_CONFIG, show_default=True, help="The organization file.")
@click.option("--hubs", default=2, show_default=True, type=click.IntRange(1, 32),
              help="Hub transport nodes per site.")
@click.option("--redis-url", help="Use this Redis instead of starting an embedded one (its password is kept in "
              "secrets.toml, not in site.json).")
@click.option("--redis-port", default=0, type=int, help="Port of the embedded Redis (default: free).")
@click.option("--redis-replicas", default=0, show_default=True, type=click.IntRange(0, 8),
              help="Replicas of the embedded Redis: N >= 1 starts a primary, N replicas and three Sentinels "
                   "on loopback (every process of the site follows a failover); 0: one Redis.")
@click.option("--fsync", type=click.Choice(["always", "everysec", "no"]), default="always",
              show_default=True, help="appendfsync of the embedded Redis (see README: Guarantees).")
@click.option("--flower/--no-flower", default=True, show_default=True, help="Start Flower.")
@click.option("--flower-port", default=0, type=click.IntRange(0, 65535),
              help=f"Port of Flower [default: {ports.FLOWER} when free, else a free one].")
@click.option("--viewer-port", default=0, type=click.IntRange(0, 65535),
              help=f"Port of the Queue Viewer [default: {ports.VIEWER} when free, else a free one].")
@click.option("--smtp-port", default=0, type=click.IntRange(0, 65535),
              help=f"Port of the first hub's Default and Internet connectors (port 25 in the organization "
                   f"file) [default: {ports.SMTP} when free, else a free one].")
@click.option("--client-port", default=0, type=click.IntRange(0, 65535),
              help=f"Port of the first hub's Client connector (port 587 in the organization file) "
                   f"[default: {ports.CLIENT} when free, else a free one].")
@click.option("--free-ports", is_flag=True,
              help=f"Free ports only, none of the defaults (SMTP {ports.SMTP} and {ports.CLIENT}, Flower "
                   f"{ports.FLOWER}, the viewer {ports.VIEWER}, the demo Internet's MX port).")
@click.option("--concurrency", default=2, show_default=True, type=click.IntRange(1, 64),
              help="Worker processes per hub.")
@click.option("--internet/--no-internet", default=True, show_default=True,
              help="Start the demo Internet (DNS and MX hosts for fabrikam.example and others) "
                   "and point the organization's DNS at it.")
@click.option("--edge/--no-edge", default=True, show_default=True,
              help="Start an Edge Transport server (EDGE-01, its own Redis) subscribed to the first site: "
                   "the organization's MX host, with its anti-spam agents; the hubs keep only the "
                   "organization's own connectors.")
@data_dir_option
@handle_errors
def up(config_path: Path, hubs: int, redis_url: str | None, redis_port: int, redis_replicas: int, fsync: str,
       flower: bool,
       flower_port: int, viewer_port: int, smtp_port: int, client_port: int, free_ports: bool,
       concurrency: int, internet: bool, edge: bool, data_dir: Path) -> None:
    """Start the site and keep it running until Ctrl-C or SIGTERM.

    Ports: the first hub of the organization's first site (amsterdam-hub-1 in the demo) has its
    Default and Internet connectors on 127.0.0.1:2525 and its Client connector on 2587, Flower
    5555, the Queue Viewer 8080, the demo Internet's MX hosts the port of the DNS-routed send
    connector (2525): each when free, else a free port (another site may have it). Every other
    port is a free one. All are printed, and "The site is up" only once every one answers."""
    if redis_replicas and redis_url:
        raise click.UsageError("--redis-replicas starts the site's own replicated Redis; it cannot be combined "
                               "with --redis-url (pass an external group's redis+sentinel:// URL instead)")
    setup_logging("INFO")
    org = load_org(config_path)
    runner = Site(SiteConfig(org=org, config_path=config_path.resolve(), data_dir=data_dir,
                             hubs_per_site=hubs, redis_url=redis_url, redis_port=redis_port,
                             redis_replicas=redis_replicas, fsync=fsync,
                             flower=flower, flower_port=flower_port, viewer_port=viewer_port,
                             smtp_port=smtp_port, client_port=client_port, concurrency=concurrency,
                             internet=internet, edge=edge, default_ports=not free_ports))
    signal.signal(signal.SIGTERM, runner.request_stop)
    signal.signal(signal.SIGINT, runner.request_stop)
    try:
        runner.start()
        _print_endpoints(runner.state())
        click.echo("\nThe site is up. Ctrl-C stops it; `mailyard site status` shows it.", err=False)
        runner.supervise()
    finally:
        click.echo("stopping the site...", err=True)
        runner.stop()
        click.echo("stopped.", err=True)


def _print_endpoints(state: dict[str, Any]) -> None:
    rows = []
    secrets_file = state.get("secrets_file")
    for p in state["processes"]:
        where = p.get("url") or ""
        if p.get("smtp"):
            where = ", ".join(f"{k} {v}" for k, v in p["smtp"].items())
        if p.get("logon") and secrets_file:  # where its credential is (never the credential itself)
            where += f"  (logon: {p['logon'].replace(secrets_file, Path(secrets_file).name)})"
        up = p.get("up", True)
        role = p["role"] + (f" ({p['replication']})" if p.get("replication") else "")
        rows.append((role, p["name"], p.get("site", ""), where, p.get("pid") or "",
                     "down" if not up else "up" if p.get("ready", True) else "starting"))
    click.echo(table(rows, ["Role", "Name", "Site", "Endpoint", "PID", "State"]))
    click.echo(f"\nRedis: {redisconn.redacted(state['redis_url'])}   data: {state['data_dir']}")
    group = [p for p in state["processes"] if p["role"] in ("redis", "sentinel") and replicas.STATE_KEY in state]
    if group:
        primary = [p["name"] for p in group if p.get("replication") == replicas.PRIMARY]
        following = [p["name"] for p in group if p.get("replication") == replicas.REPLICA]
        named = sorted({str(p.get("primary")) for p in group if p["role"] == "sentinel" and p.get("primary")})
        click.echo(f"Replicated Redis: primary {', '.join(primary) or 'none'}; "
                   f"replicas {', '.join(following) or 'none'}; "
                   f"the Sentinels name {' / '.join(named) or 'none'} "
                   f"(service {state[replicas.STATE_KEY].get('service')})")
    if state.get("running", True):
        for p in state["processes"]:
            if not p.get("ready", True) and p.get("waiting_for"):
                click.echo(f"  {p['name']}: {p['waiting_for']}")
    if state.get("redis_server"):
        click.echo(f"Redis server: {state['redis_server']}")
    if secrets_file:
        click.echo(f"Secrets: {secrets_file} (mode 0600, yours only): Flower's user and password [flower], "
                   "the Queue Viewer's token and its /metrics-only metrics_token [viewer], "
                   "Redis's password [redis]"
                   + (", the Edge's Redis's password [edge]" if any(p["role"] == "edge" for p in state["processes"])
                      else ""))


def site_status(data_dir: Path) -> dict[str, Any]:
    state = read_state(data_dir)
    if state is None:
        raise SiteError(f"no site has run from {data_dir} (no site.json); start one with `mailyard site up`")
    runner = int(state.get("runner_pid") or 0)
    state["running"] = bool(runner) and _pid_alive(runner)
    live_hubs: dict[str, registry.HubInfo] = {}
    try:
        r = redisconn.connect(site_redis_url(state["redis_url"], data_dir))
        r.ping()
        live_hubs = {h.name: h for h in registry.hubs(r)}
    except Exception:
        pass
    for p in state["processes"]:
        pid = p.get("pid")
        # (a process killed but not yet reaped by the runner is a zombie: down)
        p["up"] = bool(state["running"] and pid and _pid_alive(int(pid)) and process_state(int(pid)) != "Z")
        p["ready"] = bool(p["up"] and p.get("ready", True))  # (the runner says, after its checks)
        hub = live_hubs.get(p["name"])
        if hub is not None and hub.endpoints:
            p["smtp"] = hub.endpoints
    if state.get(replicas.STATE_KEY):
        _look_at_group(state, data_dir)
    # What a runner that is gone wrote last is not ready, nor is a site with a process down.
    state["ready"] = bool(state["running"] and state.get("ready") and all(p["ready"] for p in state["processes"]))
    return state


def _look_at_group(state: dict[str, Any], data_dir: Path) -> None:
    """The replicated Redis as its members say now: each node's ``replication`` (primary,
    replica, or None when it does not answer), the primary each Sentinel names, and each
    member ready only while the group can lose its primary (mailyard.site.replicas)."""
    group = state[replicas.STATE_KEY]
    layout = Layout(Path(group["root"]), [int(p) for p in group["nodes"]], [int(p) for p in group["sentinels"]],
                    service=str(group.get("service") or "mailyard"))
    try:
        password = redisconn.password_of(site_redis_url(state["redis_url"], data_dir))
    except SiteError:
        password = None
    view = replicas.look(layout, password)
    nodes = {replicas.node_name(i): i for i in range(len(layout.node_ports))}
    sentinels = {replicas.sentinel_name(j): j for j in range(len(layout.sentinel_ports))}
    running = [nodes[p["name"]] for p in state["processes"] if p["name"] in nodes and p["role"] == "redis" and p["up"]]
    for p in state["processes"]:
        if p["role"] == "redis" and p["name"] in nodes:
            i = nodes[p["name"]]
            p["replication"] = view.nodes[i].replication
            problem = view.node_problem(i, running)
        elif p["role"] == "sentinel" and p["name"] in sentinels:
            j = sentinels[p["name"]]
            p["primary"] = view.node_of_address(view.sentinels[j].primary)
            problem = view.sentinel_problem(j, running)
        else:
            continue
        if p["up"] and problem is not None:
            p["ready"], p["waiting_for"] = False, problem


@site.command()
@data_dir_option
@json_option
@handle_errors
def status(data_dir: Path, as_json: bool) -> None:
    """Endpoints and processes of the local site, and whether each is up."""
    state = site_status(data_dir)
    if as_json:
        print_json(state)
        return
    click.echo(f"site {'running' if state['running'] else 'not running'} "
               f"(config {state.get('config')})")
    _print_endpoints(state)


@site.command()
@data_dir_option
@handle_errors
def down(data_dir: Path) -> None:
    """Stop the site started from this data directory."""
    state = read_state(data_dir)
    pid = int((state or {}).get("runner_pid") or 0)
    if not pid or not _pid_alive(pid):
        raise SiteError("no running site found")
    os.kill(pid, signal.SIGTERM)

    def running() -> bool:  # (a runner that exited but whose parent has not reaped it yet is a zombie: gone)
        return _pid_alive(pid) and process_state(pid) != "Z"
    deadline = time.monotonic() + 60
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    click.echo("stopped." if not running() else f"runner {pid} is still stopping")
