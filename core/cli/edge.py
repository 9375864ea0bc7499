"""``mailyard edge`` (on an Edge Transport server) and ``mailyard org edge`` (on the
organization's side): subscribe, import, sync, look (mailyard.edgesync)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mailyard.cli.common import connect, data_dir_option, handle_errors, json_option, print_json, redis_option, table
from mailyard.errors import SiteError
from mailyard.units import parse_duration


def _when(at: float | None) -> str:
    if not at:
        return "never"
    ago = time.time() - at
    return f"{ago:.0f}s ago" if ago < 120 else f"{ago / 60:.0f}m ago"


# region: on the Edge

@click.group()
def edge() -> None:
    """An Edge Transport server: the perimeter node that takes the Internet's mail for a site."""


EDGE_PASSWORD_FILE = "MAILYARD_EDGE_REDIS_PASSWORD_FILE"


def _with_password_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from mailyard import redisconn

    return redisconn.with_password_file(value, EDGE_PASSWORD_FILE) if value else value


def _edge_redis(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--redis-url", envvar="MAILYARD_EDGE_REDIS_URL", required=True, callback=_with_password_file,
                      help=f"The Edge's own Redis (never the organization's); without a password in it, the one "
                           f"in the file {EDGE_PASSWORD_FILE} names.")(fn)
    return data_dir_option(fn)


def _host_port(value: str, what: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint=what)
    return value


@edge.command()
@click.option("--name", required=True, help="The Edge's name (Exchange: its server name), e.g. EDGE-01.")
@click.option("--fqdn", help="Its FQDN, in its banner and its certificate (default: NAME.edge.invalid).")
@click.option("--smtp", required=True, metavar="HOST:PORT",
              help="Where its receive connector listens, and where the hubs reach it.")
@click.option("--sync", "sync_address", required=True, metavar="HOST:PORT",
              help="Where its EdgeSync listener listens (HTTPS; Exchange: 50636), and where the hubs reach it.")
@click.option("--smtp-listen", default="", metavar="HOST:PORT",
              help="Where the receive connector listens, when the hubs reach it by another address "
                   "(0.0.0.0:25 behind --smtp edge.example:25: a NAT, a container on several networks).")
@click.option("--sync-listen", default="", metavar="HOST:PORT", help="The same for the EdgeSync listener.")
@click.option("--file", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the subscription file (mode 0600: it holds the bootstrap secret).")
@click.option("--valid", "validity", default="24h", show_default=True,
              help="How long the bootstrap secret is valid (at least 2m).")
@click.option("--unless-subscribed", is_flag=True,
              help="Do nothing (exit 0) if this Edge is subscribed already (a deployment's first-start step).")
@data_dir_option
@handle_errors
def subscribe(name: str, fqdn: str | None, smtp: str, sync_address: str, smtp_listen: str, sync_listen: str,
              out: Path, validity: str, unless_subscribed: bool, data_dir: Path) -> None:
    """Write a subscription file for `mailyard org edge import` (New-EdgeSubscription)."""
    from mailyard import pki
    from mailyard.edge.home import EdgeHome

    for what, value in (("--smtp", smtp), ("--sync", sync_address), ("--smtp-listen", smtp_listen),
                        ("--sync-listen", sync_listen)):
        if value or what in ("--smtp", "--sync"):
            _host_port(value, what)
    try:
        seconds = parse_duration(validity)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--valid") from None
    home = EdgeHome(data_dir)
    if unless_subscribed and home.exists() and (subscribed := home.subscribed()) is not None:
        click.echo(f"Edge {home.name} is subscribed to site {subscribed.site} of {subscribed.organization}: "
                   "nothing to do")
        return
    sub = home.subscribe(name=name, fqdn=fqdn or f"{name.lower()}.edge.invalid", smtp=smtp, sync=sync_address,
                         validity=seconds, smtp_listen=smtp_listen, sync_listen=sync_listen)
    pki.write_private(out, sub.model_dump_json(indent=2).encode())
    click.echo(f"wrote {out} (mode 0600): import it on the organization's side within {validity} with\n"
               f"  mailyard org edge import {out} --site <site>\n"
               f"then delete it: it holds the bootstrap secret in clear")


@edge.command()
@_edge_redis
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--concurrency", default=2, show_default=True, type=click.IntRange(1, 256))
@click.option("--rspamd", "rspamd_setting", default="auto", show_default=True, metavar="auto|off|URL",
              help="Content filtering: start Debian's rspamd if installed (auto), none (off), or that server.")
@click.option("--dns-server", "dns_servers", multiple=True, metavar="IP[:PORT]",
              help="The Edge's own DNS server (repeatable), for MX, SPF, DKIM, DMARC and block lists, instead "
                   "of the organization's transport dns_servers (an Edge in a perimeter network).")
@handle_errors
def run(redis_url: str, data_dir: Path, loglevel: str, concurrency: int, rspamd_setting: str,
        dns_servers: tuple[str, ...]) -> None:
    """Run the Edge: its EdgeSync listener, and its transport once subscribed."""
    from mailyard.edge.run import serve
    from mailyard.processes import setup_logging

    if rspamd_setting not in ("auto", "off") and not rspamd_setting.startswith(("http://", "https://")):
        raise click.BadParameter(f"{rspamd_setting!r}: auto, off or an http(s):// URL", param_hint="--rspamd")
    from mailyard.edge.rspamd import nameserver

    for value in dns_servers:
        try:
            nameserver(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--dns-server") from None
    setup_logging(loglevel)
    serve(data_dir=data_dir, redis_url=redis_url, loglevel=loglevel, concurrency=concurrency,
          rspamd_setting=rspamd_setting, dns_servers=list(dns_servers))


@edge.command()
@click.option("--listen", default="127.0.0.1:11333", show_default=True, metavar="HOST:PORT",
              help="Where rspamd's normal worker listens (its HTTP protocol: POST /checkv2).")
@click.option("--dns-server", "dns_servers", multiple=True, metavar="IP[:PORT]",
              help="rspamd's DNS servers (repeatable) [default: 127.0.0.1:53].")
@data_dir_option
@handle_errors
def rspamd(listen: str, dns_servers: tuple[str, ...], data_dir: Path) -> None:
    """Run rspamd for an Edge in the foreground, as `edge run` starts its own (`edge run --rspamd URL`
    elsewhere, e.g. a service of its own in docker compose), with the Edge's configuration."""
    import os

    from mailyard.edge.rspamd import Rspamd

    host, _, port = _host_port(listen, "--listen").rpartition(":")
    try:
        server = Rspamd(data_dir, list(dns_servers), host.strip("[]"), console=True)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--dns-server") from None
    server.port = int(port)
    argv = server.command()
    click.echo(f"rspamd on {listen} (configuration {server.dir / 'rspamd.conf'})", err=True)
    os.execve(argv[0], argv, server.environment())


@edge.command()
@_edge_redis
@json_option
@handle_errors
def status(redis_url: str, data_dir: Path, as_json: bool) -> None:
    """What the Edge has from EdgeSync and when it last came (Get-EdgeSubscription, on the Edge)."""
    from mailyard import keys, redisconn
    from mailyard.edge.home import EdgeHome
    from mailyard.redisconn import text_map

    home = EdgeHome(data_dir)
    config = home.config()
    r = redisconn.connect(redis_url)
    state = text_map(r.hgetall(keys.EDGE_STATE))
    subscribed = home.subscribed()
    org_text = r.get(keys.ORG)
    org = json.loads(org_text) if org_text else {}
    data = {
        "name": config["name"], "fqdn": config["fqdn"], "smtp": config["smtp"], "sync": config["sync"],
        "subscribed": bool(subscribed), "organization": subscribed.organization if subscribed else None,
        "site": subscribed.site if subscribed else None,
        "config_at": float(state["config_at"]) if state.get("config_at") else None,
        "recipients_at": float(state["recipients_at"]) if state.get("recipients_at") else None,
        "recipients": r.scard(keys.EDGE_RECIPIENTS),
        "accepted_domains": org.get("accepted_domains", []),
        "send_connectors": [c["name"] for c in org.get("send_connectors", [])],
        "hubs": (org.get("edge") or {}).get("hubs", []),
        "by": state.get("by"),
    }
    if as_json:
        print_json(data)
        return
    where = f"site {data['site']} of {data['organization']}" if subscribed else "not subscribed yet"
    click.echo(f"Edge {data['name']} ({data['fqdn']}): {where}")
    click.echo(f"  configuration: {_when(data['config_at'])}  recipients: {data['recipients']} "
               f"({_when(data['recipients_at'])})")
    click.echo(f"  accepted domains: {', '.join(data['accepted_domains']) or '-'}")
    click.echo(f"  send connectors: {', '.join(data['send_connectors']) or '-'}")
    click.echo(f"  hubs: {', '.join(data['hubs']) or '-'}")


@edge.command()
@data_dir_option
@handle_errors
def unsubscribe(data_dir: Path) -> None:
    """Forget the subscription on the Edge (Remove-EdgeSubscription there)."""
    from mailyard.edge.home import EdgeHome

    EdgeHome(data_dir).unsubscribe()
    click.echo("unsubscribed: the organization's certificates are gone; `mailyard edge subscribe` makes a new file")

# endregion


# region: on the organization's side

@click.group("edge")
def org_edge() -> None:
    """Edge subscriptions of the organization: import, list, sync, remove."""


@org_edge.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--site", required=True, help="The site whose hubs take the Edge's mail and push EdgeSync to it.")
@click.option("--pki-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The organization's CA (default: <data-dir>/pki).")
@click.option("--unless-subscribed", is_flag=True,
              help="Do nothing (exit 0) if FILE is not there and an Edge is subscribed to SITE, or if FILE's Edge "
                   "is subscribed already with the same certificate (a deployment's first-start step).")
@click.option("--remove-file", is_flag=True, help="Delete FILE once it was imported (it holds the bootstrap secret).")
@redis_option
@handle_errors
def import_(file: Path, site: str, pki_dir: Path | None, unless_subscribed: bool, remove_file: bool,
            redis_url: str | None, data_dir: Path) -> None:
    """Subscribe the Edge of FILE to SITE (New-EdgeSubscription -FileData -Site)."""
    import time

    from mailyard import pki
    from mailyard.edge_subscriptions import import_subscription, remove_subscription, sync_states
    from mailyard.edgesync import internet_connector_name, read_subscription
    from mailyard.errors import SiteError
    from mailyard.orgstore import read_org

    r = connect(redis_url, data_dir)
    if unless_subscribed:
        _, org = read_org(r)
        if not file.exists() and any(e.site == site for e in org.edge_subscriptions):
            click.echo(f"no {file}, and site {site} has an Edge subscribed: nothing to do")
            return
        if file.exists():
            sub = read_subscription(file)
            same = [s for s in sync_states(r) if s.edge.name == sub.edge
                    and pki.fingerprint(s.edge.certificate) == pki.fingerprint(sub.certificate)]
            if same and same[0].bootstrapped:
                if remove_file:
                    file.unlink()
                click.echo(f"Edge {sub.edge} is subscribed already: nothing to do")
                return
            if same:  # (imported, never bootstrapped: this file has the Edge's newer secret)
                if sub.expired(time.time()):
                    raise SiteError(f"{file}: its bootstrap secret expired; the subscription imported before "
                                    "stays: run `mailyard edge subscribe` on the Edge again")
                remove_subscription(r, sub.edge)
    sub = read_subscription(file)
    _, edge = import_subscription(r, sub, site, pki_dir or pki.pki_dir(data_dir))
    if remove_file:
        file.unlink()
    click.echo(f"subscribed Edge {edge.name} to site {site}: its hubs push EdgeSync to https://{edge.sync} "
               f"(certificate {pki.fingerprint(edge.certificate)[:16]}...), and send Internet mail through it "
               f"({internet_connector_name(site)!r})." + ("" if remove_file else
                                                         f" Delete {file}: it holds the bootstrap secret"))


@org_edge.command("list")
@redis_option
@json_option
@handle_errors
def list_(redis_url: str | None, data_dir: Path, as_json: bool) -> None:
    """The subscribed Edges and their EdgeSync (Get-EdgeSubscription, Test-EdgeSynchronization)."""
    from mailyard.edge_subscriptions import sync_states

    states = sync_states(connect(redis_url, data_dir))
    if as_json:
        print_json([s.as_dict() for s in states])
        return
    rows = [(s.edge.name, s.edge.site, s.edge.smtp, "yes" if s.bootstrapped else "no", _when(s.config_at),
             f"{s.recipients} ({_when(s.recipients_at)})", s.error or "") for s in states]
    click.echo(table(rows, ["Edge", "Site", "SMTP", "Bootstrapped", "Config", "Recipients", "Last error"]))


@org_edge.command("sync")
@click.argument("names", nargs=-1)
@click.option("--wait", default=0.0, type=click.FloatRange(0), metavar="SECONDS",
              help="Wait up to this long for the push to be done.")
@redis_option
@handle_errors
def sync(names: tuple[str, ...], wait: float, redis_url: str | None, data_dir: Path) -> None:
    """Push configuration and recipients to the Edges now (Start-EdgeSynchronization)."""
    from mailyard.edge_subscriptions import request_sync, sync_pending, sync_states

    r = connect(redis_url, data_dir)
    chosen = request_sync(r, list(names) or None)
    deadline = time.monotonic() + wait
    while wait and any(sync_pending(r, n) for n in chosen) and time.monotonic() < deadline:
        time.sleep(0.2)
    if wait:
        states = {s.edge.name: s for s in sync_states(r)}
        failed = [f"{n}: {states[n].error}" for n in chosen if n in states and sync_pending(r, n)]
        if failed:
            raise SiteError("EdgeSync not done within the wait: " + "; ".join(failed))
        click.echo(f"synchronized {', '.join(chosen)}")
    else:
        click.echo(f"EdgeSync asked for {', '.join(chosen)}: the site's hubs push within a second")


@org_edge.command("remove")
@click.argument("name")
@redis_option
@handle_errors
def remove(name: str, redis_url: str | None, data_dir: Path) -> None:
    """Remove an Edge's subscription (Remove-EdgeSubscription)."""
    from mailyard.edge_subscriptions import remove_subscription

    remove_subscription(connect(redis_url, data_dir), name)
    click.echo(f"removed Edge {name}: no more EdgeSync, and its certificate no longer logs on to the hubs")

# endregion


# region: DKIM keys (signed on the Edges)

@click.group("dkim")
def org_dkim() -> None:
    """DKIM keys of the accepted domains: the Edges sign what leaves for the Internet.

    A new key is pending: publish its TXT record, then `activate` it; the domain's active key
    (if any) signs until then."""


def _dkim_domain(domain: str) -> str:
    from mailyard.addresses import normalize_domain

    try:
        return normalize_domain(domain)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="DOMAIN") from None


def _dkim_selector(selector: str | None, hint: str = "--selector") -> str | None:
    from mailyard import dkim_keys

    if selector is None:
        return None
    try:
        return dkim_keys.check_selector(selector)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def _dkim_row(key: Any) -> dict[str, Any]:
    from mailyard import dkim_keys

    return {"domain": key.domain, "selector": key.selector, "state": "active" if key.active else "pending",
            "name": dkim_keys.txt_name(key), "txt": dkim_keys.txt_value(key),
            "txt_strings": dkim_keys.txt_strings(dkim_keys.txt_value(key)), "created": key.created}


@org_dkim.command("new")
@click.argument("domain")
@click.option("--selector", help="The key's selector, one DNS label (default: myYYYYMM).")
@click.option("--activate", is_flag=True,
              help="Sign with it at once (its TXT record is published already), in place of the active key.")
@redis_option
@json_option
@handle_errors
def dkim_new(domain: str, selector: str | None, activate: bool, redis_url: str | None, data_dir: Path,
             as_json: bool) -> None:
    """Make a new DKIM key for DOMAIN (pending) and print the TXT record to publish."""
    from mailyard import dkim_keys
    from mailyard.edge_subscriptions import request_sync

    domain, selector = _dkim_domain(domain), _dkim_selector(selector)
    r = connect(redis_url, data_dir)
    active = next((k for k in dkim_keys.signing_keys(r) if k.domain == domain), None)
    key = dkim_keys.new_key(r, domain, selector, activate=activate)
    edges = request_sync(r) if activate else []
    if as_json:
        print_json({**_dkim_row(key), "edges": edges})
        return
    click.echo(f"a new DKIM key for {key.domain} (selector {key.selector}); publish this TXT record:\n\n"
               f"{dkim_keys.zone_line(key)}\n")
    if activate:
        click.echo(f"it is active: the Edges ({', '.join(edges) or 'none subscribed yet'}) sign with it from their "
                   "next EdgeSync (asked for now)")
        return
    meanwhile = (f"{key.domain}'s key {active.selector} signs until then" if active
                 else f"{key.domain}'s mail is not signed until then")
    click.echo(f"it is pending: once the record is published, `mailyard org dkim activate {key.domain} {key.selector}` "
               f"({meanwhile})")


@org_dkim.command("activate")
@click.argument("domain")
@click.argument("selector")
@redis_option
@handle_errors
def dkim_activate(domain: str, selector: str, redis_url: str | None, data_dir: Path) -> None:
    """Sign DOMAIN's mail with its pending key SELECTOR (its TXT record published), in place of its active key."""
    from mailyard import dkim_keys
    from mailyard.edge_subscriptions import request_sync

    domain, checked = _dkim_domain(domain), _dkim_selector(selector, "SELECTOR")
    assert checked is not None
    r = connect(redis_url, data_dir)
    key = dkim_keys.activate_key(r, domain, checked)
    edges = request_sync(r)
    click.echo(f"the key {key.selector} of {key.domain} is active: the Edges "
               f"({', '.join(edges) or 'none subscribed yet'}) sign with it from their next EdgeSync (asked for now)")


@org_dkim.command("list")
@redis_option
@json_option
@handle_errors
def dkim_list(redis_url: str | None, data_dir: Path, as_json: bool) -> None:
    """The domains' DKIM keys, active (signing) or pending (`activate`), and the record each needs."""
    from mailyard import dkim_keys

    rows = [_dkim_row(k) for k in dkim_keys.all_keys(connect(redis_url, data_dir))]
    if as_json:
        print_json(rows)
        return
    click.echo(table([(x["domain"], x["selector"], x["state"], x["name"]) for x in rows],
                     ["Domain", "Selector", "State", "Record"]))


@org_dkim.command("remove")
@click.argument("domain")
@click.option("--selector", help="Only the key of this selector (e.g. a pending one); default: every key of DOMAIN.")
@redis_option
@handle_errors
def dkim_remove(domain: str, selector: str | None, redis_url: str | None, data_dir: Path) -> None:
    """Remove DOMAIN's DKIM keys: its mail is no longer signed (from the Edges' next EdgeSync)."""
    from mailyard import dkim_keys
    from mailyard.edge_subscriptions import request_sync

    domain, selector = _dkim_domain(domain), _dkim_selector(selector)
    r = connect(redis_url, data_dir)
    removed = dkim_keys.remove_key(r, domain, selector)
    if any(k.active for k in removed):
        request_sync(r)
    for key in removed:
        click.echo(f"removed the {'active' if key.active else 'pending'} DKIM key {key.selector} of {domain}")

# endregion
