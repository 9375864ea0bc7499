"""``mailyard viewer``: serve the Queue Viewer page, its JSON API and /metrics."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import click

from mailyard.cli.common import connect, handle_errors, redis_option, resolve_redis_url
from mailyard.errors import SiteError
from mailyard.processes import serve_until_stopped, setup_logging
from mailyard.site.secrets import is_placeholder

TOKEN_ENV = "MAILYARD_VIEWER_TOKEN"
METRICS_TOKEN_ENV = "MAILYARD_VIEWER_METRICS_TOKEN"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SiteError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port).")
@click.option("--token", envvar=TOKEN_ENV, metavar="TOKEN",
              help="Require 'Authorization: Bearer TOKEN' for the API (reads and actions) and /metrics "
                   f"(or set {TOKEN_ENV}). Required on an address that is not loopback.")
@click.option("--metrics-token", envvar=METRICS_TOKEN_ENV, metavar="TOKEN",
              help="A second token that opens /metrics only, for a Prometheus scraper "
                   f"(or set {METRICS_TOKEN_ENV}); needs --token.")
@click.option("--secrets-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Without --token: use the tokens kept in DIR/secrets.toml (mode 0600), generating them "
                   "on the first start (as `site up` does for its data directory; docker compose uses this).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A host name the page and API answer to (repeatable): the name people reach it by "
                   "when it listens on a non-loopback address (a container's 0.0.0.0). Any other Host "
                   "header is refused, so no web page reaches it through DNS rebinding.")
@redis_option
@handle_errors
def viewer(host: str, port: int, token: str | None, metrics_token: str | None, secrets_dir: Path | None,
           allowed_hosts: tuple[str, ...], redis_url: str | None, data_dir: Path) -> None:
    """Serve the Queue Viewer: queues and messages of every hub, actions, tracking, /metrics.

    With a token, everything but the page itself and /health needs it: reads show every
    sender, recipient and subject, and export gives the full text of suspended mail. Without
    one, it listens on loopback only. `mailyard site up` always runs it with the token it keeps
    in <data dir>/secrets.toml.
    """
    import uvicorn

    from mailyard.hub.queue_viewer import create_app

    token, metrics_token = token or None, metrics_token or None
    if secrets_dir is not None and token is None:
        from mailyard.site import secrets as site_secrets

        kept = site_secrets.ensure(secrets_dir, skip={"redis", "operator", "flower"})  # (only its own)
        token, metrics_token = kept.viewer_token, metrics_token or kept.metrics_token
        click.echo(f"Queue Viewer tokens: {kept.path} [viewer]")
    for option, value in (("--token", token), ("--metrics-token", metrics_token)):
        if value is not None and is_placeholder(value):
            raise SiteError(f"{option}: {value!r} is a well-known placeholder, not a secret; choose your own, "
                            "e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if metrics_token and not token:
        raise SiteError("--metrics-token needs --token (without a token, /metrics is open anyway)")
    if not token and not _is_loopback(host):
        raise SiteError(f"the Queue Viewer shows every message and can remove mail: on {host}, which is not a "
                        f"loopback address, it needs a token (--token or {TOKEN_ENV})")
    connect(redis_url, data_dir)  # a clear error now rather than on the first request
    url = resolve_redis_url(redis_url, data_dir)
    setup_logging("WARNING")
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    logon = "; the API and /metrics need its token" if token else " (no token: open to every local user)"
    click.echo(f"Queue Viewer: http://{shown}:{bound_port}/  (metrics: http://{shown}:{bound_port}/metrics){logon}")
    # On loopback, only loopback host names: a web page cannot reach it through DNS rebinding.
    hosts = ["127.0.0.1", "localhost", "[::1]", host] if _is_loopback(host) or allowed_hosts else None
    if hosts is not None:
        hosts += [h.strip().lower() for h in allowed_hosts]
    app = create_app(url, token=token, metrics_token=metrics_token, allowed_hosts=hosts)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, server_header=False,
                                           http="h11", h11_max_incomplete_event_size=64 * 1024))
    serve_until_stopped(server, [sock])
