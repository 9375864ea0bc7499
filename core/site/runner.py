"""``mailyard site up``: start a whole site on this machine and keep it running.

It starts an embedded Redis with AOF (unless given one), applies the organization file,
starts one process per mailbox server, the hubs of each site, Flower and the Queue Viewer,
restarts any child that dies (with a growing pause), writes every endpoint to
``<data dir>/site.json`` and stops everything it started on Ctrl-C or SIGTERM. Children die
with it even if it is killed outright (Linux's parent-death signal).

Flower and the Queue Viewer always need a logon, and Redis a password: these secrets are
generated into ``<data dir>/secrets.toml`` (mode 0600, see mailyard.site.secrets) and kept
across restarts. Each child gets only the secrets it needs, in its environment (never on its
command line, which every local user can read in ``ps``): every child Redis's URL with the
password (``MAILYARD_REDIS_URL``), Flower and the viewer their logons. None is written to
site.json (its ``redis_url`` has no password; the CLI adds the one of secrets.toml) or a log.
The embedded Redis reads its password from a 0600 file in its data directory (0700).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailyard import pki, redisconn
from mailyard.errors import SiteError
from mailyard.org import Organization
from mailyard.orgstore import apply_org
from mailyard.processes import die_with_parent
from mailyard.redisconn import number
from mailyard.site import redis_server
from mailyard.site import secrets as site_secrets
from mailyard.site.redis_server import free_port

log = logging.getLogger("mailyard.site")

STOP_GRACE_S = 15.0
MAX_BACKOFF_S = 30.0

FLOWER_BASIC_AUTH = "FLOWER_BASIC_AUTH"
FLOWER_UNAUTHENTICATED_API = "FLOWER_UNAUTHENTICATED_API"
VIEWER_TOKEN = "MAILYARD_VIEWER_TOKEN"
VIEWER_METRICS_TOKEN = "MAILYARD_VIEWER_METRICS_TOKEN"
# Settings of the person's shell that a child must not inherit: the runner sets the secrets
# itself, each to the one child that needs it, from secrets.toml.
NOT_INHERITED = (FLOWER_BASIC_AUTH, FLOWER_UNAUTHENTICATED_API, VIEWER_TOKEN, VIEWER_METRICS_TOKEN)


def _own_group_dying_with_parent() -> None:
    die_with_parent()
    os.setpgrp()  # Ctrl-C in the terminal reaches the runner, which stops children in order


def mailyard_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mailyard", *args]


def hub_names(site: str, count: int) -> list[str]:
    return [f"{site.lower()}-hub-{i}" for i in range(1, count + 1)]


@dataclass
class Child:
    name: str
    role: str
    cmd: list[str]
    log_path: Path
    endpoints: dict[str, Any] = field(default_factory=dict)  # strings, and a hub's "smtp": connector -> address
    proc: subprocess.Popen | None = None
    umask: int = -1  # -1: the runner's
    restarts: int = 0
    backoff: float = 1.0
    next_start: float = 0.0
    started_at: float = 0.0

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")  # noqa: SIM115 (kept by the child)
        self.proc = subprocess.Popen(
            self.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, preexec_fn=_own_group_dying_with_parent, umask=self.umask,
        )
        out.close()
        self.started_at = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "pid": self.proc.pid if self.proc else None,
            "restarts": self.restarts,
            "log": str(self.log_path),
            **self.endpoints,
        }


@dataclass
class SiteConfig:
    org: Organization
    config_path: Path
    data_dir: Path
    hubs_per_site: int = 2
    redis_url: str | None = None
    redis_port: int = 0
    fsync: str = "always"
    flower: bool = True
    flower_port: int = 0
    viewer: bool = True
    viewer_port: int = 0
    concurrency: int = 2
    host: str = "127.0.0.1"
    internet: bool = True


class Site:
    def __init__(self, cfg: SiteConfig) -> None:
        self.cfg = cfg
        self.data_dir = cfg.data_dir.resolve()
        self.children: list[Child] = []
        self.redis: Child | None = None
        self.redis_url = cfg.redis_url or ""
        self.ready = False
        self._stopping = False
        self._ports: set[int] = set()
        self.secrets_file = site_secrets.secrets_path(self.data_dir)
        self.secrets: site_secrets.SiteSecrets | None = None

    # region: plan

    def _port(self) -> int:
        """A free loopback port not handed out before (the OS may offer one twice)."""
        while True:
            port = free_port(self.cfg.host)
            if port not in self._ports:
                self._ports.add(port)
                return port

    def plan(self) -> None:
        cfg, logs = self.cfg, self.data_dir / "logs"
        if not cfg.redis_url:
            if self.secrets is None or not self.secrets.redis_password:
                raise SiteError("the site's secrets are not loaded")  # (start() loads them first)
            password = self.secrets.redis_password
            port = cfg.redis_port or self._port()
            self.redis_url = redisconn.with_password(f"redis://{cfg.host}:{port}/0", password)
            self.redis = Child(
                "redis", "redis",
                redis_server.command(self.data_dir / "redis", port, fsync=cfg.fsync, host=cfg.host,
                                     password=password),
                logs / "redis.log", {"url": redisconn.without_password(self.redis_url)},
                umask=redis_server.UMASK,
            )
        # Redis's URL (it holds the password) reaches every child in its environment (see env()).
        common = ["--data-dir", str(self.data_dir)]
        for site in cfg.org.sites:
            for server in site.mailbox_servers:
                port = self._port()
                url = f"https://{cfg.host}:{port}"
                self.children.append(Child(
                    server, "mailbox",
                    mailyard_cmd("mailbox", "serve", "--server", server, "--host", cfg.host,
                                 "--port", str(port), *common),
                    logs / f"{server}.log", {"site": site.name, "url": url},
                ))
        for site in cfg.org.sites:
            bindings = sorted({b for c in cfg.org.receive_connectors if not c.sites or site.name in c.sites
                               for b in c.bindings})
            for name in hub_names(site.name, cfg.hubs_per_site):
                # Each hub of the local site gets its own loopback port per configured binding.
                actual = {b: f"{cfg.host}:{self._port()}" for b in bindings}
                bind_args = [arg for b, a in actual.items() for arg in ("--bind", f"{b}={a}")]
                smtp = {c.name: actual[b] for c in cfg.org.receive_connectors
                        if not c.sites or site.name in c.sites for b in c.bindings[:1]}
                self.children.append(Child(
                    name, "hub",
                    mailyard_cmd("hub", "--site", site.name, "--name", name,
                                 "--concurrency", str(cfg.concurrency), *bind_args, *common),
                    logs / f"{name}.log", {"site": site.name, "smtp": smtp},
                ))
        if cfg.internet:
            # The demo Internet: DNS for the outside domains, and their MX hosts on the port
            # the DNS-routed send connectors use. The organization is pointed at this DNS.
            self.dns_port = self._port()
            ports = {c.port for c in cfg.org.send_connectors if c.dns_routing} or {25}
            self.children.append(Child(
                "internet", "internet",
                mailyard_cmd("internet", "serve", "--dns", f"{cfg.host}:{self.dns_port}",
                             "--smtp-port", str(min(ports)), "--data-dir", str(self.data_dir)),
                logs / "internet.log",
                {"url": f"dns {cfg.host}:{self.dns_port}, mail in {self.data_dir / 'internet'}"},
            ))
        if cfg.flower:
            port = cfg.flower_port or self._port()
            self.children.append(Child(
                "flower", "flower",
                [sys.executable, "-m", "celery", "-A", "mailyard.flower", "flower",
                 f"--address={cfg.host}", f"--port={port}", "--purge_offline_workers=60"],
                logs / "flower.log",
                {"url": f"http://{cfg.host}:{port}", "logon": f"user and password in {self.secrets_file} [flower]"},
            ))
        if cfg.viewer:
            # The Queue Viewer: its page, JSON API and /metrics, all behind its token (in the
            # environment, see env_for).
            port = cfg.viewer_port or self._port()
            self.children.append(Child(
                "viewer", "viewer",
                mailyard_cmd("viewer", "--host", cfg.host, "--port", str(port), *common),
                logs / "viewer.log",
                {"url": f"http://{cfg.host}:{port}/", "logon": f"token in {self.secrets_file} [viewer]"},
            ))

    # endregion

    def org_to_apply(self) -> Organization:
        org = self.cfg.org
        if self.secrets is not None:
            org, self.secrets = site_secrets.with_site_passwords(org, self.data_dir)
        if not self.cfg.internet:
            return org
        transport = org.transport.model_copy(update={"dns_servers": [f"{self.cfg.host}:{self.dns_port}"]})
        return org.model_copy(update={"transport": transport})

    def env(self) -> dict[str, str]:
        """What every child's environment has (no secret: see env_for)."""
        env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
        env[redisconn.ENV_URL] = self.redis_url
        env["MAILYARD_DATA_DIR"] = str(self.data_dir)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def env_for(self, child: Child, env: dict[str, str]) -> dict[str, str]:
        """``env`` with the secrets this child needs: Flower its logon, the viewer its tokens."""
        if child.role not in ("flower", "viewer"):
            return env
        if self.secrets is None:
            raise SiteError("the site's secrets are not loaded")  # (start() loads them first)
        if child.role == "flower":
            # Basic auth covers Flower's pages and REST API (and, see mailyard.flower, /metrics).
            return {**env, FLOWER_BASIC_AUTH: self.secrets.flower_basic_auth}
        return {**env, VIEWER_TOKEN: self.secrets.viewer_token, VIEWER_METRICS_TOKEN: self.secrets.metrics_token}

    def load_secrets(self) -> site_secrets.SiteSecrets:
        """Read (or first create) ``secrets.toml``: the secrets of this site's Flower, viewer and
        Redis. With ``--redis-url``, its password (or none) is the site's [redis] password: the
        CLI takes it from there, as site.json has the URL without it."""
        for name in NOT_INHERITED:
            if os.environ.get(name):
                log.warning("%s is set in the environment: ignored; the site uses the secrets in %s",
                            name, self.secrets_file)
        forced: dict[tuple[str, str], str | None] = {}
        if self.cfg.redis_url:
            forced[site_secrets.REDIS_PASSWORD] = redisconn.password_of(self.cfg.redis_url)
        self.secrets = site_secrets.ensure(self.data_dir, set_values=forced)
        return self.secrets

    def start(self) -> None:
        # A new data directory is the operator's only (an existing one keeps its mode).
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self._refuse_if_running()
        self.load_secrets()
        # The organization's CA, and a certificate for each site's hubs and each mailbox server
        # (kept, and renewed near their end, on later starts).
        pki.issue_all(pki.pki_dir(self.data_dir), self.cfg.org.name,
                      [(s.name, s.mailbox_servers) for s in self.cfg.org.sites])
        self.plan()
        env = self.env()
        if self.redis:
            self.redis.start(env)
            redis_server.wait_ready(self.redis_url, self.redis.proc)
        else:
            redis_server.wait_ready(self.redis_url, None, timeout=5)
        apply_org(redisconn.connect(self.redis_url), self.org_to_apply())
        for child in self.children:
            child.start(self.env_for(child, env))
        self.write_state()
        self.wait_ready()
        self.ready = True
        self.write_state()

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until every mailbox server serves its API and every hub heart-beats."""
        import httpx

        from mailyard import keys, registry

        r = redisconn.connect(self.redis_url)
        deadline = time.monotonic() + timeout
        pending = {c.name for c in self.children}
        while pending:
            for child in self.children:
                if child.name not in pending:
                    continue
                if not child.alive:
                    raise SiteError(f"{child.name} exited while starting; see {child.log_path}")
                pid = child.proc.pid if child.proc else -1  # (alive: it has one)
                if child.role == "mailbox":
                    ok = number(r.hget(keys.server(child.name), "pid")) == pid
                elif child.role == "hub":
                    ok = child.name in {h.name for h in registry.hubs(r) if h.alive(5.0)} and number(
                        r.hget(keys.hub(child.name), "pid")) == pid
                elif child.role == "flower":
                    try:
                        ok = httpx.get(child.endpoints["url"] + "/healthcheck", timeout=1).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                elif child.role == "viewer":
                    try:
                        ok = httpx.get(child.endpoints["url"].rstrip("/") + "/health", timeout=1).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                else:
                    ok = True
                if ok:
                    pending.discard(child.name)
            if pending and time.monotonic() > deadline:
                raise SiteError(f"not ready after {timeout:.0f}s: {', '.join(sorted(pending))}")
            time.sleep(0.1)

    def _refuse_if_running(self) -> None:
        state = self.data_dir / "site.json"
        if not state.exists():
            return
        try:
            pid = int(json.loads(state.read_text()).get("runner_pid", 0))
        except (ValueError, OSError):
            return
        if pid and pid != os.getpid() and _pid_alive(pid):
            raise SiteError(f"a site is already running from {self.data_dir} (runner pid {pid}); "
                            "stop it with `mailyard site down` or Ctrl-C")

    def all_children(self) -> list[Child]:
        return ([self.redis] if self.redis else []) + self.children

    def state(self) -> dict[str, Any]:
        return {
            "runner_pid": os.getpid(),
            "config": str(self.cfg.config_path),
            "data_dir": str(self.data_dir),
            "redis_url": redisconn.without_password(self.redis_url),  # the CLI adds the password of secrets.toml
            "secrets_file": str(self.secrets_file),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "ready": self.ready,
            "processes": [c.describe() for c in self.all_children()],
        }

    def write_state(self) -> None:
        path = self.data_dir / "site.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2))
        os.replace(tmp, path)

    def supervise(self) -> None:
        """Restart children that die, until asked to stop."""
        env = self.env()
        while not self._stopping:
            changed = False
            now = time.monotonic()
            for child in self.all_children():
                if child.alive or self._stopping:
                    continue
                if child.next_start == 0.0:
                    code = child.proc.returncode if child.proc else None
                    # A child that ran for a while gets a quick restart; a crash loop backs off.
                    if now - child.started_at > 60:
                        child.backoff = 1.0
                    child.next_start = now + child.backoff
                    log.warning("%s (%s) exited with status %s; restarting in %.0fs",
                                child.name, child.role, code, child.backoff)
                elif now >= child.next_start:
                    child.start(self.env_for(child, env))
                    child.restarts += 1
                    child.backoff = min(child.backoff * 2, MAX_BACKOFF_S)
                    child.next_start = 0.0
                    changed = True
                    if child is self.redis:
                        try:
                            redis_server.wait_ready(self.redis_url, child.proc)
                        except SiteError as exc:
                            log.error("%s", exc)
            if changed:
                self.write_state()
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop children in reverse order of need: Flower, the viewer and hubs, mailbox servers, Redis."""
        self._stopping = True
        first = ("flower", "viewer", "hub", "internet")
        order = [c for c in self.children if c.role in first]
        order += [c for c in self.children if c.role not in first]
        _terminate(order)
        if self.redis:
            _terminate([self.redis])
        state = self.data_dir / "site.json"
        try:
            data = json.loads(state.read_text())
            if data.get("runner_pid") == os.getpid():
                data["stopped"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                data["runner_pid"] = 0
                state.write_text(json.dumps(data, indent=2))
        except (OSError, ValueError):
            pass

    def request_stop(self, *_: object) -> None:
        self._stopping = True


def _terminate(children: list[Child]) -> None:
    for child in children:
        if child.alive and child.proc:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", child.name, STOP_GRACE_S)
            child.proc.kill()
            child.proc.wait()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
