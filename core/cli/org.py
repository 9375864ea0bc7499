"""``mailyard org``: show, check and apply the organization directory; hash a password for it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mailyard import passwords, pki
from mailyard.cli.common import connect, data_dir_option, handle_errors, json_option, print_json, redis_option, table
from mailyard.errors import MailyardError
from mailyard.org import Organization, load_org
from mailyard.orgstore import apply_org, read_org


@click.group()
def org() -> None:
    """The organization directory (Active Directory's part): show, check, apply."""


MASK = "********"


def public_view(o: Organization) -> dict[str, Any]:
    """The organization as JSON, every secret masked: a set password (or its hash), the server
    token and a smart host's password read ``********``, an unset one ``""``."""
    data = o.model_dump(mode="json")
    for mb in data["mailboxes"]:
        mb["password"] = _mask(mb.get("password"))
    for op in data.get("operators", []):
        op["password"] = _mask(op.get("password"))
    for conn in data["send_connectors"]:
        conn["smart_host_password"] = _mask(conn.get("smart_host_password"))
    return data


def _mask(value: object) -> str:
    return MASK if value else ""


@org.command()
@redis_option
@json_option
@handle_errors
def show(redis_url: str | None, data_dir: Path, as_json: bool) -> None:
    """Print the organization the site is running with."""
    version, o = read_org(connect(redis_url, data_dir))
    if as_json:
        print_json({"version": version, **public_view(o)})
        return
    click.echo(f"{o.name} (version {version})")
    click.echo(f"Accepted domains: {', '.join(o.accepted_domains)}")
    click.echo()
    click.echo(table([(s.name, ", ".join(s.mailbox_servers)) for s in o.sites], ["Site", "Mailbox servers"]))
    click.echo()
    click.echo(table([(m.address, m.name, ", ".join(m.aliases), m.server) for m in o.mailboxes],
                     ["Mailbox", "Name", "Aliases", "Server"]))
    if o.groups:
        click.echo()
        click.echo(table([(g.address, ", ".join(g.members)) for g in o.groups], ["Group", "Members"]))
    if o.contacts:
        click.echo()
        click.echo(table([(c.name, c.address or "", c.external_address) for c in o.contacts],
                         ["Contact", "Address", "External address"]))
    if o.send_connectors:
        click.echo()
        click.echo(table(
            [(c.name, ", ".join(str(s) for s in c.address_spaces),
              "DNS" if c.dns_routing else ", ".join(c.smart_hosts),
              ", ".join(c.source_sites or c.source_servers) or "all sites", "yes" if c.enabled else "no")
             for c in o.send_connectors],
            ["Send connector", "Address spaces", "Routing", "Source", "Enabled"]))
    if o.receive_connectors:
        click.echo()
        click.echo(table(
            [(c.name, ", ".join(c.sites) or "all sites", ", ".join(c.bindings),
              ", ".join(c.permission_groups), ", ".join(c.auth_mechanisms))
             for c in o.receive_connectors],
            ["Receive connector", "Sites", "Bindings", "Permission groups", "Auth"]))


@org.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@handle_errors
def check(file: Path) -> None:
    """Validate an organization file without applying it."""
    o = load_org(file)
    click.echo(f"{file}: valid ({len(o.sites)} sites, {len(o.mailboxes)} mailboxes, "
               f"{len(o.groups)} groups, {len(o.contacts)} contacts)")


def _dns_server(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """Each value is IP[:PORT] (the resolver takes addresses, not names)."""
    import ipaddress

    from mailyard.internet.dns import parse_address

    for value in values:
        try:
            host, _ = parse_address(value)
            ipaddress.ip_address(host)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not IP[:PORT] (e.g. 198.51.100.10:5300)") from None
    return values


def with_dns_servers(o: Organization, servers: list[str]) -> Organization:
    """The organization with transport.dns_servers replaced (as `site up` does for its demo DNS)."""
    transport = o.transport.model_copy(update={"dns_servers": list(servers)})
    return o.model_copy(update={"transport": transport})


@org.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dns-server", "dns_servers", multiple=True, metavar="IP[:PORT]", callback=_dns_server,
              help="Use this DNS server (repeatable) instead of the file's transport.dns_servers, "
                   "e.g. the demo Internet's in docker compose.")
@click.option("--secrets-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Apply the passwords kept in DIR/secrets.toml, generated the first time, as `site up` "
                   "does: the local operator's ([operator]) and one for each mailbox whose password is "
                   "the demo's ([mailboxes]). Default: the data directory's, when it has one (docker "
                   "compose's init service names its volume).")
@redis_option
@handle_errors
def apply(file: Path, dns_servers: tuple[str, ...], secrets_dir: Path | None, redis_url: str | None,
          data_dir: Path) -> None:
    """Validate FILE and make it the directory every node uses, live (no restarts)."""
    from mailyard.site import secrets as site_secrets

    o = load_org(file)
    if dns_servers:
        o = with_dns_servers(o, list(dns_servers))
    if secrets_dir is None and site_secrets.secrets_path(data_dir).exists():
        secrets_dir = data_dir
    if secrets_dir is not None:
        o, kept = site_secrets.with_site_passwords(o, secrets_dir)
        click.echo(f"passwords of the local operator and of the demo's mailboxes: {kept.path}")
    else:
        demo = [mb.address for mb in o.mailboxes if site_secrets.is_demo_password(mb.password)]
        if demo:
            click.echo(f"warning: {len(demo)} mailbox(es) ({', '.join(demo[:3])}...) have the demo's well-known "
                       "passwords; give --secrets-dir (or run where `site up` keeps its secrets.toml) to have "
                       "them replaced by generated ones", err=True)
    version = apply_org(connect(redis_url, data_dir), o)
    dns = f"; DNS servers {', '.join(dns_servers)}" if dns_servers else ""
    click.echo(f"applied {file} as version {version}: {len(o.sites)} sites, "
               f"{len(o.mailboxes)} mailboxes, {len(o.groups)} groups, {len(o.contacts)} contacts{dns}")


@org.command("hash-password")
@click.option("--stdin", "from_stdin", is_flag=True,
              help="Read the password from standard input (one line) instead of a prompt.")
@handle_errors
def hash_password(from_stdin: bool) -> None:
    """Print the hash of a mailbox password, for the organization file's mailboxes[].password.

    On a terminal the password is asked twice, without echo; with --stdin it is read from
    standard input (e.g. `mailyard org hash-password --stdin < password-file`). It is never
    taken from the command line, where every user's `ps` would see it."""
    if from_stdin:
        password = _read_stdin()
    elif not sys.stdin.isatty():
        raise MailyardError("standard input is not a terminal: pass --stdin to read the password from it")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt="Repeat the password",
                                err=True)
    if not password:
        raise MailyardError("the password is empty (an empty password in the organization file means "
                            "the mailbox cannot log on)")
    if passwords.is_hash(password):
        raise MailyardError("that is already a password hash: give the password itself")
    click.echo(passwords.hash_password(password))


def _read_stdin() -> str:
    data = sys.stdin.buffer.read(64 * 1024 + 1)
    if len(data) > 64 * 1024:
        raise MailyardError("standard input holds more than 64 KiB: give one line, the password")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MailyardError("the password on standard input is not UTF-8") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if "\n" in text or "\r" in text:
        raise MailyardError("standard input holds more than one line: give one line, the password")
    return text


@org.group()
def ca() -> None:
    """The organization's certificate authority: every hub and mailbox server proves who it
    is with a certificate from it (``site up`` makes it and them in <data-dir>/pki)."""


def _pki_dir_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--pki-dir", type=click.Path(file_okay=False, path_type=Path),
                        help="Where the CA and the certificates are (default: <data-dir>/pki).")(data_dir_option(fn))


@ca.command("init")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_pki_dir_option
@click.option("--export", "export_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also copy each node's certificate, key and the CA certificate (never the CA key) "
              "into DIR/<node> (hub-<site>, mailbox-<server>): a volume per node in compose.")
@click.option("--owner", type=click.IntRange(0), metavar="UID",
              help="With --export, give each node's directory and files to this user (run as root).")
@handle_errors
def ca_init(file: Path, pki_dir: Path | None, data_dir: Path, export_dir: Path | None, owner: int | None) -> None:
    """Create the CA of the organization in FILE (unless there is one), and a certificate for
    each site's hubs and each mailbox server it names (unless a valid one is there)."""
    o = load_org(file)
    where = pki_dir or pki.pki_dir(data_dir)
    created = not pki.CA(where).exists()
    sites = [(s.name, s.mailbox_servers) for s in o.sites]
    ca_ = pki.issue_all(where, o.name, sites)
    state = "created" if created else "kept"
    click.echo(f"{state} the CA of {o.name} in {ca_.dir} (key {ca_.key_path.name}, mode 0600)")
    for identity in pki.node_identities(sites):
        line = f"  {identity}: {ca_.dir / identity.file_stem}.crt ({identity.dns_name})"
        if export_dir is not None:
            out = pki.export(ca_, identity, export_dir / identity.file_stem, owner=owner)
            line += f" -> {out}"
        click.echo(line)


def _edge_commands() -> None:
    from mailyard.cli.edge import org_dkim, org_edge

    org.add_command(org_edge, "edge")
    org.add_command(org_dkim, "dkim")


_edge_commands()
