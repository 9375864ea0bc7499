"""``mailyard viewer``: serve the Queue Viewer page, its JSON API and /metrics."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import click

from mailyard.cli.common import connect, handle_errors, redis_option, resolve_redis_url
from mailyard.errors import SiteError
from mailyard.processes import setup_logging


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
@click.option("--token", envvar="MAILYARD_VIEWER_TOKEN", metavar="TOKEN",
              help="Require 'Authorization: Bearer TOKEN' for actions (or set MAILYARD_VIEWER_TOKEN).")
@redis_option
@handle_errors
def viewer(host: str, port: int, token: str | None, redis_url: str | None, data_dir: Path) -> None:
    """Serve the Queue Viewer: queues and messages of every hub, actions, tracking, /metrics."""
    import uvicorn

    from mailyard.hub.queue_viewer import create_app

    connect(redis_url, data_dir)  # a clear error now rather than on the first request
    url = resolve_redis_url(redis_url, data_dir)
    setup_logging("WARNING")
    if not token and not _is_loopback(host):
        click.echo(f"warning: listening on {host} without a token: anyone who reaches it can suspend and "
                   "remove mail (use --token or MAILYARD_VIEWER_TOKEN)", err=True)
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"Queue Viewer: http://{shown}:{bound_port}/  (metrics: http://{shown}:{bound_port}/metrics)")
    # On loopback, only loopback host names: a web page cannot reach it through DNS rebinding.
    hosts = ["127.0.0.1", "localhost", "[::1]", host] if _is_loopback(host) else None
    app = create_app(url, token=token or None, allowed_hosts=hosts)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, server_header=False,
                                           http="h11", h11_max_incomplete_event_size=64 * 1024))
    server.run(sockets=[sock])
