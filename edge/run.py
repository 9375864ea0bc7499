"""``mailyard edge run``: an Edge Transport server.

One process holds the EdgeSync listener (mailyard.edge.sync_server) and supervises the Edge's
transport: the hub's pipeline (``mailyard hub``: receive connector, categorizer, send
connectors, sweeper, a Celery worker) on the Edge's own Redis and its own copy of the
organization, started once the first EdgeSync brought a configuration and restarted if it
dies. Its queues are in the Edge's Redis, persisted as a hub's are: an Edge killed in the
middle of a stream loses nothing it acknowledged.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import redis
import uvicorn

from mailyard import keys, processes, redisconn
from mailyard.edge import rspamd
from mailyard.edge.home import EdgeHome
from mailyard.edge.rspamd import Rspamd
from mailyard.edge.sync_server import Trust, create_app
from mailyard.peer_http import PeerH11
from mailyard.processes import serve_until_stopped

log = logging.getLogger("mailyard.edge")


def host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def listener_trust(home: EdgeHome) -> Trust:
    """The EdgeSync listener's context: the Edge's self-signed certificate; client
    certificates verified against the organization's CA once it is subscribed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(home.cert_path, home.key_path)
    trust = Trust(ctx)
    ca = home.node_cert().ca_path
    if home.subscribed() is not None and ca.exists():
        trust.load(ca)
    return trust


class Transport:
    """The Edge's transport process (``mailyard hub`` for the Edge's site), supervised."""

    def __init__(self, *, name: str, redis_url: str, data_dir: Path, loglevel: str, concurrency: int) -> None:
        self.argv = [sys.executable, "-m", "mailyard", "hub", "--site", name, "--name", name,
                     "--data-dir", str(data_dir), "--loglevel", loglevel, "--concurrency", str(concurrency)]
        # The Edge's Redis (its password in it) in the environment, never on a command line
        # that every local user can read; the Edge's environment has no other Redis.
        self.env = {k: v for k, v in os.environ.items() if k != redisconn.ENV_PASSWORD_FILE}
        self.env[redisconn.ENV_URL] = redis_url
        self.proc: subprocess.Popen[bytes] | None = None
        self.wanted = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def want(self) -> None:
        self.wanted.set()

    def supervise(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if self.wanted.is_set() and (self.proc is None or self.proc.poll() is not None):
                    if self.proc is not None:
                        log.warning("the Edge's transport ended (status %s): starting it again", self.proc.returncode)
                    # (its output is this process's; it dies with the Edge)
                    self.proc = subprocess.Popen(self.argv, env=self.env, preexec_fn=processes.die_with_parent)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()


def content_filter(data_dir: Path, setting: str, r: redis.Redis,
                   dns_servers: list[str] | None = None) -> tuple[Rspamd | None, str]:
    """``--rspamd``: ``auto`` starts Debian's rspamd if it is installed, ``off`` runs without,
    a URL uses that server. (The Rspamd to supervise, the URL for the transport.) An rspamd
    that does not start leaves the Edge without content filtering, said in its log: the
    Edge's mail does not stop for it."""
    if setting == "off":
        return None, ""
    if setting != "auto":
        return None, setting.rstrip("/")
    if rspamd.binary() is None:
        log.warning("rspamd is not installed: this Edge runs without content filtering "
                    "(apt-get install rspamd, or --rspamd URL)")
        return None, ""
    text = r.get(keys.ORG)
    dns = dns_servers or (json.loads(text)["transport"]["dns_servers"] if text else [])
    try:
        server = rspamd.Rspamd(data_dir, dns).start()
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("rspamd did not start (%s): this Edge runs without content filtering", exc)
        return None, ""
    log.info("content filtering by rspamd on %s", server.url)
    return server, server.url


def serve(*, data_dir: Path, redis_url: str, loglevel: str = "INFO", concurrency: int = 2,
          rspamd_setting: str = "auto", dns_servers: list[str] | None = None) -> None:
    home = EdgeHome(data_dir)
    config = home.config()
    r = redisconn.connect(redis_url)
    content, rspamd_url = content_filter(data_dir, rspamd_setting, r, dns_servers)
    trust = listener_trust(home)
    transport = Transport(name=config["name"], redis_url=redis_url, data_dir=data_dir, loglevel=loglevel,
                          concurrency=concurrency)
    app = create_app(home, r, trust, on_config=transport.want, rspamd_url=rspamd_url, dns_servers=dns_servers)
    host, port = host_port(home.listen("sync"))
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # (before it is announced: a hub that comes early waits rather than being refused)
    # (uvicorn makes its own context from files; the listener's must be this one, which the
    # bootstrap changes while it runs)
    web_config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", http=PeerH11,
                                loop="uvloop", h11_max_incomplete_event_size=64 * 1024,
                                ssl_certfile=str(home.cert_path), ssl_keyfile=str(home.key_path))
    web_config.load()
    web_config.ssl = trust.ctx
    web = uvicorn.Server(web_config)
    if r.hget(keys.EDGE_STATE, "config_at"):  # (configured before this start)
        transport.want()
    subscribed = home.subscribed()
    threading.Thread(target=transport.supervise, name="transport", daemon=True).start()
    if content is not None:
        threading.Thread(target=_keep, args=(content, transport), name="rspamd", daemon=True).start()
    state = f"subscribed to site {subscribed.site}" if subscribed else "waiting for its subscription"
    print(f"Edge {config['name']} ({state}): EdgeSync on https://{home.listen('sync')}, SMTP on {home.listen('smtp')}, "
          f"pid {os.getpid()}", flush=True)
    try:
        serve_until_stopped(web, [sock])
    finally:
        transport.stop()
        if content is not None:
            content.stop()


KEEP_BACKOFF_S = (2.0, 120.0)  # rspamd started again after 2 s, doubling to 2 min while it fails


def _keep(content: Rspamd, transport: Transport) -> None:
    """Start rspamd again if it dies (on the same port: the transport's URL stays right),
    with a growing pause while it keeps failing (the transport checks without it meanwhile)."""
    pause = KEEP_BACKOFF_S[0]
    while not transport._stop.wait(pause):
        if content.alive:
            pause = KEEP_BACKOFF_S[0]
            continue
        log.warning("rspamd ended: starting it again")
        try:
            content.start()
            pause = KEEP_BACKOFF_S[0]
        except (OSError, RuntimeError) as exc:
            pause = min(pause * 2, KEEP_BACKOFF_S[1])
            log.error("rspamd did not start again (%s): next try in %.0f s", exc, pause)
