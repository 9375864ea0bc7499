"""``mailyard health``: one-shot health checks for container healthchecks and monitoring.

Each check prints one line saying why, and exits 0 when healthy, 1 when not:

- ``health hub``: the hub's Celery worker answers a ping (``hub@<name>``), its heartbeat in
  Redis is recent, and every receive connector of its site has a listener that answers with
  an SMTP greeting (the hub publishes where they listen: ``mailyard.registry.hubs``);
- ``health mailbox --url URL``: the mailbox server's API answers ``/health``;
- ``health http URL``: any URL answers 2xx (Flower's ``/healthcheck``, the viewer's ``/health``);
- ``health smtp HOST:PORT``: an SMTP server greets (the demo Internet's MX host).
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx
import redis

from mailyard import pki, redisconn, registry
from mailyard.cli.common import data_dir_option, redis_option, resolve_redis_url
from mailyard.errors import MailyardError

DEFAULT_TIMEOUT = 5.0


def _healthy(line: str) -> NoReturn:
    click.echo(f"healthy: {line}")
    sys.exit(0)


def _unhealthy(line: str) -> NoReturn:
    click.echo(f"unhealthy: {line}")
    sys.exit(1)


def _timeout_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--timeout", default=DEFAULT_TIMEOUT, show_default=True, type=click.FloatRange(0.1, 300),
                        help="Seconds to wait for each answer.")(fn)


def _split(address: str, default_port: int = 25) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; an unspecified address (0.0.0.0, ::) means this host."""
    address = address.strip()
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, sep, port = address.rpartition(":")
        if not sep:
            host, port = address, ""
    if not port.isdigit():
        if port:
            raise ValueError(f"{address!r} is not HOST:PORT")
        port = str(default_port)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host, int(port)
    if ip.is_unspecified:
        host = "::1" if ip.version == 6 else "127.0.0.1"
    return host, int(port)


def smtp_greeting(address: str, timeout: float) -> str:
    """Connect, read the greeting (its last line), say QUIT. Raises OSError or ValueError."""
    host, port = _split(address)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        buf = b""
        deadline = time.monotonic() + timeout
        while True:
            # A greeting may span lines ("220-..." then "220 ..."); the last has a space.
            lines = buf.split(b"\r\n")
            done = [ln for ln in lines[:-1] if len(ln) >= 4 and ln[3:4] == b" "]
            if done:
                last = done[0].decode("ascii", "replace")
                break
            if time.monotonic() > deadline or len(buf) > 4096:
                raise ValueError("no SMTP greeting")
            chunk = sock.recv(1024)
            if not chunk:
                raise ValueError("closed the connection without a greeting" if not buf
                                 else f"closed the connection after {buf[:80]!r}")
            buf += chunk
        if not last[:3].isdigit():
            raise ValueError(f"answered {last[:80]!r}, not SMTP")
        try:
            sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        return last


@click.group()
def health() -> None:
    """Health checks (exit 0 healthy, 1 not, one line saying why): for container healthchecks."""


@health.command(name="hub")
@click.option("--name", help="The hub's node name [default: this host's name, as `mailyard hub` picks it].")
@_timeout_option
@redis_option
def hub_health(name: str | None, timeout: float, redis_url: str | None, data_dir: Path) -> None:
    """A hub is healthy when its Celery worker answers a ping, its heartbeat is recent, and
    every receive connector of its site accepts connections (answers with an SMTP greeting)."""
    from mailyard.broker import make_app
    from mailyard.hub.node import default_name
    from mailyard.orgstore import read_org

    name = name or default_name()
    try:
        url = resolve_redis_url(redis_url, data_dir)
    except MailyardError as exc:
        _unhealthy(str(exc))
    try:
        r = redisconn.connect(url)
        _, org = read_org(r)
        info = next((h for h in registry.hubs(r) if h.name == name), None)
    except (redis.RedisError, MailyardError) as exc:
        _unhealthy(f"hub {name}: cannot read its state in Redis at {redisconn.redacted(url)}: {exc}")
    if info is None:
        _unhealthy(f"hub {name} has not registered in Redis (not started, or another name)")
    timeout_s = org.transport.hub_heartbeat_timeout
    if not info.alive(timeout_s):
        _unhealthy(f"hub {name}: last heartbeat {(registry.now_ms() - info.heartbeat) / 1000:.0f}s ago "
                   f"(more than {timeout_s:g}s)")

    # The worker itself: Celery's remote control, over Redis pub/sub, answered by the
    # worker's main process even while every pool process is busy.
    app = make_app(url)
    node = f"hub@{name}"
    try:
        with app.connection_for_write() as conn:
            replies = app.control.ping(destination=[node], timeout=timeout, connection=conn)
    except Exception as exc:  # kombu raises many kinds when Redis is away
        _unhealthy(f"{node}: cannot ask the worker: {exc}")
    if not any(node in reply for reply in replies or []):
        _unhealthy(f"{node}: the Celery worker does not answer a ping within {timeout:g}s")

    # The receive connectors: those of the hub's site must all be listening and greet.
    wanted = sorted(c.name for c in org.receive_connectors
                    if c.enabled and (not c.sites or info.site in c.sites))
    missing = [c for c in wanted if c not in info.endpoints]
    if missing:
        _unhealthy(f"{node}: receive connector(s) {', '.join(missing)} not listening "
                   f"(listening: {', '.join(f'{k} {v}' for k, v in sorted(info.endpoints.items())) or 'none'})")
    by_address: dict[str, list[str]] = {}
    for connector in wanted:
        by_address.setdefault(info.endpoints[connector], []).append(connector)
    for address, names in sorted(by_address.items()):
        try:
            smtp_greeting(address, timeout)
        except (OSError, ValueError) as exc:
            _unhealthy(f"{node}: receive connector(s) {', '.join(names)} at {address}: {exc}")
    listening = "; ".join(f"{', '.join(n)} at {a}" for a, n in sorted(by_address.items()))
    _healthy(f"{node} (site {info.site}) answers ping; receive connectors greet: {listening or 'none configured'}")


@health.command(name="mailbox")
@click.option("--url", required=True, help="The mailbox server's API, e.g. https://127.0.0.1:8000.")
@click.option("--server", required=True, help="The mailbox server's name: its certificate must name it.")
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path),
              help="The organization's CA certificate (default: <data-dir>/pki/ca.crt).")
@data_dir_option
@_timeout_option
def mailbox_health(url: str, server: str, ca_file: Path | None, data_dir: Path, timeout: float) -> None:
    """A mailbox server is healthy when its API answers /health over TLS with its certificate
    from the organization's CA."""
    target = url.rstrip("/")
    if not target.endswith("/health"):
        target += "/health"
    identity = pki.Identity.mailbox(server)
    ca = ca_file or pki.pki_dir(data_dir) / pki.CA_CERT
    try:
        with httpx.Client(verify=pki.trust_context(ca), timeout=timeout) as client:
            response = client.get(target, headers={"Host": identity.dns_name}, extensions=pki.sni(identity))
    except OSError as exc:
        _unhealthy(f"cannot read the CA certificate {ca}: {exc.strerror or exc}")
    except httpx.HTTPError as exc:
        _unhealthy(f"{target}: {exc or type(exc).__name__}")
    if response.status_code != 200:
        _unhealthy(f"{target}: HTTP {response.status_code}")
    try:
        data = response.json()
        what = f"mailbox server {data['server']} ({data['mailboxes']} mailboxes)"
    except (ValueError, KeyError, TypeError):
        _unhealthy(f"{target}: not a mailbox server's answer: {response.text[:80]!r}")
    _healthy(f"{what} answers at {url}")


@health.command(name="http")
@click.argument("url")
@_timeout_option
def http_health(url: str, timeout: float) -> None:
    """URL answers with a 2xx status (Flower's /healthcheck, the Queue Viewer's /health)."""
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        _unhealthy(f"{url}: {exc or type(exc).__name__}")
    if not response.is_success:
        _unhealthy(f"{url}: HTTP {response.status_code}")
    _healthy(f"{url}: HTTP {response.status_code}")


@health.command(name="smtp")
@click.argument("address", metavar="HOST:PORT")
@_timeout_option
def smtp_health(address: str, timeout: float) -> None:
    """An SMTP server at HOST:PORT greets (any reply code: it is listening and answering)."""
    try:
        greeting = smtp_greeting(address, timeout)
    except (OSError, ValueError) as exc:
        _unhealthy(f"{address}: {exc}")
    _healthy(f"{address}: {greeting[:100]}")
