"""``mailyard internet``: the demo Internet (DNS with MX records and SMTP sinks) on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
from pathlib import Path

import click

from mailyard.cli.common import (
    connect,
    data_dir_option,
    handle_errors,
    json_option,
    print_json,
    redis_option,
    table,
)
from mailyard.errors import SiteError
from mailyard.internet.dns import AAAA, MX, TXT, A, DnsServer, Record, Zone, parse_address
from mailyard.internet.sink import Sink, list_messages

DEMO_DOMAINS = ("fabrikam.example", "tailspintoys.example", "wingtiptoys.example")
DEFAULT_DNS = "127.0.0.1:5300"
SUBDIR = "internet"


def _folder(folder: Path | None, data_dir: Path) -> Path:
    return folder if folder is not None else data_dir / SUBDIR


@click.group()
def internet() -> None:
    """The demo Internet: DNS MX records and SMTP sinks for outside domains, on loopback."""


@internet.command()
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path),
              help="Where the sinks store mail, one folder per domain [default: DATA_DIR/internet].")
@click.option("--dns", "dns_address", default=DEFAULT_DNS, show_default=True,
              help="HOST:PORT of the DNS server (UDP and TCP; port 0 picks a free one).")
@click.option("--smtp-port", default=2525, show_default=True, type=click.IntRange(0, 65535),
              help="Port of every MX host (0 picks a free one).")
@click.option("--domain", "domains", multiple=True, metavar="NAME",
              help=f"A domain to serve (repeatable) [default: {', '.join(DEMO_DOMAINS)}].")
@click.option("--first-ip", default="127.0.0.2", show_default=True,
              help="Loopback address of the first domain's MX host; the next domains get the next ones.")
@click.option("--mx-address", metavar="IP",
              help="Give every domain's MX host this one address, with one SMTP sink there for all of them "
                   "(e.g. the container's address in docker compose) instead of loopback addresses.")
@click.option("--record", "records", multiple=True, metavar="'NAME TYPE VALUE'",
              help="Another record to serve (repeatable): 'contoso.com MX 10 mx.contoso.com', "
                   "'mx.contoso.com A 127.0.0.10', 'sel._domainkey.contoso.com TXT v=DKIM1; ...'.")
@data_dir_option
@handle_errors
def serve(folder: Path | None, dns_address: str, smtp_port: int, domains: tuple[str, ...], first_ip: str,
          mx_address: str | None, records: tuple[str, ...], data_dir: Path) -> None:
    """Serve MX records for the demo domains and receive their mail until Ctrl-C or SIGTERM.

    Each domain gets `MX 10 mx.<domain>`, that host an A record on its own loopback address
    (or on --mx-address for all), an SPF record that lets that address send its mail, and an
    SMTP sink there that stores what it receives (see `mailyard internet show`).
    """
    try:
        dns_host, dns_port = parse_address(dns_address)
        first = ipaddress.IPv4Address(first_ip)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    shared: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    if mx_address is not None:
        try:
            shared = ipaddress.ip_address(mx_address)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--mx-address") from None
        if shared.is_unspecified:
            raise click.BadParameter("the MX hosts need an address others can reach, not "
                                     f"{mx_address}", param_hint="--mx-address")
    elif not first.is_loopback:
        raise click.BadParameter(f"{first_ip} is not a loopback address", param_hint="--first-ip")
    names = [d.strip().rstrip(".").lower() for d in domains or DEMO_DOMAINS]
    try:
        extra = [parse_record(text) for text in records]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--record") from None
    asyncio.run(_serve(_folder(folder, data_dir), dns_host, dns_port, smtp_port, names, first, shared, extra))


def parse_record(text: str) -> tuple[str, Record]:
    """``NAME TYPE VALUE`` (MX's value ``PREFERENCE HOST``; TXT's the rest of the line)."""
    parts = text.split(None, 2)
    if len(parts) != 3:
        raise ValueError(f"{text!r}: NAME TYPE VALUE")
    name, rdtype, value = parts[0], parts[1].upper(), parts[2].strip()
    if rdtype == "MX":
        preference, _, host = value.partition(" ")
        if not preference.isdigit() or not host.strip():
            raise ValueError(f"{text!r}: an MX record's value is PREFERENCE HOST")
        return name, MX(int(preference), host.strip())
    try:
        if rdtype == "A":
            return name, A(value)
        if rdtype == "AAAA":
            return name, AAAA(value)
        if rdtype == "TXT":
            return name, TXT(value)
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"{text!r}: {exc}") from None
    raise ValueError(f"{text!r}: the type is MX, A, AAAA or TXT")


async def _serve(folder: Path, dns_host: str, dns_port: int, smtp_port: int, domains: list[str],
                 first: ipaddress.IPv4Address,
                 shared: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
                 records: list[tuple[str, Record]] | None = None) -> None:
    zone = Zone(ttl=60)
    for name, record in records or []:
        zone.add(name, record)
    dns = DnsServer(zone, dns_host, dns_port)
    sinks: dict[str, Sink] = {}  # address -> the sink listening there (one for all domains with --mx-address)
    rows = []
    try:
        try:
            await dns.open()
            for i, domain in enumerate(domains):
                address = str(shared if shared is not None else first + i)
                mx = zone.add_mail_domain(domain, address)
                zone.add(domain, TXT(f"v=spf1 ip{6 if ':' in address else 4}:{address} -all"))  # (its MX host sends)
                sink = sinks.get(address)
                if sink is None:
                    # A sink stores by recipient domain, so one serves every domain at its address.
                    sink = Sink(folder, address, smtp_port, hostname=mx)
                    await sink.open()
                    smtp_port = sink.port  # port 0: the others take the same one
                    sinks[address] = sink
                shown = f"[{address}]" if ":" in address else address
                rows.append((domain, f"10 {mx}", address, f"{shown}:{sink.port}"))
        except OSError as exc:
            raise SiteError(f"cannot listen: {exc}") from None
        click.echo(f"DNS   {dns.address} (UDP and TCP)")
        click.echo(f"Mail  {folder.resolve()}")
        click.echo(table(rows, ["Domain", "MX", "A", "SMTP"]))
        click.echo("Serving; Ctrl-C or SIGTERM stops.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        for sink in sinks.values():
            await sink.close()
        await dns.close()
    click.echo("Stopped.")


@internet.command()
@click.argument("domain")
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path),
              help="The sinks' folder [default: DATA_DIR/internet].")
@data_dir_option
@json_option
@handle_errors
def show(domain: str, folder: Path | None, data_dir: Path, as_json: bool) -> None:
    """List the messages the demo Internet received for DOMAIN, oldest first."""
    items = list_messages(_folder(folder, data_dir), domain)
    if as_json:
        print_json(items)
        return
    if not items:
        click.echo(f"No messages for {domain} in {_folder(folder, data_dir)}.")
        return
    click.echo(table(
        [(m["received_at"], m["envelope_from"] or "<>", ";".join(m["envelope_to"]), m["subject"][:40],
          m["message_id"]) for m in items],
        ["Received", "Sender", "Recipients", "Subject", "MessageId"]))


@internet.command(name="send")
@click.option("--from", "sender", required=True, help="An outside address, e.g. grace@fabrikam.example.")
@click.option("--to", "recipients", multiple=True, required=True, help="A recipient (repeatable).")
@click.option("--subject", default="", help="The subject line.")
@click.option("--body", default="", help="The message text.")
@click.option("--source", default="127.0.0.2", show_default=True, envvar="MAILYARD_INTERNET_SOURCE",
              help="Address to send from (the Internet, as the receive connectors see it; "
                   "or set MAILYARD_INTERNET_SOURCE).")
@click.option("--server", "server", metavar="HOST:PORT", envvar="MAILYARD_INTERNET_SERVER",
              help="Hand the message to this hub address (or set MAILYARD_INTERNET_SERVER) instead of "
                   "one found in Redis, e.g. hub:2525 in docker compose, where Redis is not on the Internet.")
@redis_option
@handle_errors
def send_from_internet(sender: str, recipients: tuple[str, ...], subject: str, body: str, source: str,
                       server: str | None, redis_url: str | None, data_dir: Path) -> None:
    """Send a message from the demo Internet into the organization, over SMTP, anonymously:
    to the MX host the demo Internet's DNS gives the first recipient's domain (the Edge, in
    the demo), else to a hub's receive connector that takes mail from AnonymousUsers."""
    import smtplib
    from email.message import EmailMessage
    from email.utils import formatdate, make_msgid

    from mailyard import registry
    from mailyard.orgstore import read_org

    mx = None if server else organization_mx(recipients[0].rpartition("@")[2], data_dir)
    if server:
        endpoints = [server]
    elif mx is not None:
        endpoints = [mx]
    else:
        r = connect(redis_url, data_dir)
        _, org = read_org(r)
        anonymous = {c.name for c in org.receive_connectors
                     if c.enabled and "AnonymousUsers" in c.permission_groups}
        endpoints = [h.endpoints[name] for h in registry.hubs(r) if h.alive(org.transport.hub_heartbeat_timeout)
                     for name in anonymous if name in h.endpoints]
        if not endpoints:
            raise SiteError("no hub has a receive connector for anonymous Internet mail running")
    host, _, port = endpoints[0].rpartition(":")
    if not port.isdigit():
        raise click.BadParameter(f"{endpoints[0]!r} is not HOST:PORT", param_hint="--server")
    host = host.strip("[]")
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, ", ".join(recipients), subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or "internet.example")
    msg.set_content(body)
    try:
        with smtplib.SMTP(host, int(port), local_hostname="mail.internet.example", timeout=30,
                          source_address=(source, 0)) as client:
            refused = client.send_message(msg, from_addr=sender, to_addrs=list(recipients))
    except smtplib.SMTPException as exc:
        raise SiteError(f"{endpoints[0]} refused the message: {exc}") from None
    except OSError as exc:
        raise SiteError(f"cannot reach {endpoints[0]} from {source}: {exc}") from None
    for address, (code, text) in refused.items():
        click.echo(f"refused {address}: {code} {text.decode(errors='replace')}", err=True)
    click.echo(f"sent to {endpoints[0]} from {source}")


def organization_mx(domain: str, data_dir: Path) -> str | None:
    """HOST:PORT of the organization's MX host, as the demo Internet of the site run from
    ``data_dir`` publishes it (its DNS server, its MX port): ``domain``'s MX if it is one of the
    organization's domains there, else the first one's (a relay attempt goes to the
    organization too). None where the demo Internet publishes none (no Edge)."""
    import dns.exception
    import dns.resolver

    from mailyard.cli.common import read_state
    from mailyard.internet.dns import make_resolver

    state = read_state(data_dir) or {}
    found = next((p for p in state.get("processes", []) if p.get("role") == "internet" and p.get("dns")), None)
    if found is None or not found.get("mx") or not found.get("organization"):
        return None
    ours = [str(d) for d in found["organization"]]
    host, _, port = str(found["dns"]).rpartition(":")
    resolver = make_resolver(host, int(port))
    try:
        answer = resolver.resolve(domain if domain.lower() in ours else ours[0], "MX")
        exchange = min(answer, key=lambda rr: rr.preference).exchange.to_text()
        address = resolver.resolve(exchange, "A")[0].to_text()
    except (dns.exception.DNSException, ValueError):
        return None
    edge = next((p for p in state.get("processes", []) if p.get("role") == "edge" and p.get("edge_smtp")), None)
    port = str(edge["edge_smtp"] if edge else found["mx"][0]).rpartition(":")[2]
    return f"{address}:{port}"
