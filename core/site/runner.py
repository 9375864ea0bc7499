"""``mailyard site up``: start a whole site on this machine and keep it running.

It starts an embedded Redis with AOF (unless given one), applies the organization file,
starts one process per mailbox server, the hubs of each site, Flower and the Queue Viewer,
restarts any child that dies (with a growing pause), writes every endpoint to
``<data dir>/site.json`` and stops everything it started on Ctrl-C or SIGTERM. Children die
with it even if it is killed outright (Linux's parent-death signal).

Ports are the fixed defaults when they are free, else free ones (mailyard.site.ports); a child
whose port was taken before it could bind it is started again on another. The site is ready,
and each child started again is, only once what it serves answers (mailyard.site.readiness).

Flower and the Queue Viewer always need a logon, and Redis a password: these secrets are
generated into ``<data dir>/secrets.toml`` (mode 0600, see mailyard.site.secrets) and kept
across restarts. Each child gets only the secrets it needs, in its environment (never on its
command line, which every local user can read in ``ps``): every child Redis's URL with the
password (``MAILYARD_REDIS_URL``), Flower and the viewer their logons. None is written to
site.json (its ``redis_url`` has no password; the CLI adds the one of secrets.toml) or a log.
The embedded Redis reads its password from a 0600 file in its data directory (0700).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailyard import pki, redisconn
from mailyard.cli.internet import DEMO_DOMAINS
from mailyard.errors import SiteError
from mailyard.org import Organization
from mailyard.orgstore import apply_org
from mailyard.processes import die_with_parent
from mailyard.site import ports as site_ports
from mailyard.site import redis_server
from mailyard.site import secrets as site_secrets
from mailyard.site.readiness import Probes, connectors_of

log = logging.getLogger("mailyard.site")

STOP_GRACE_S = 15.0
MAX_BACKOFF_S = 30.0
READY_TIMEOUT_S = 120.0
FIRST_MX_IP = "127.0.0.2"  # the demo Internet's MX hosts: 127.0.0.2, .3, ... one per domain
LOST_BIND = b"address already in use"  # in a child's log (any case): its port was taken first

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
    ports: dict[str, int] = field(default_factory=dict)  # what it listens on (the site chose them)
    proc: subprocess.Popen | None = None
    umask: int = -1  # -1: the runner's
    restarts: int = 0
    backoff: float = 1.0
    next_start: float = 0.0
    started_at: float = 0.0
    ready: bool = False
    waiting_for: str = "not started"  # why it is not ready
    log_offset: int = 0  # the log's size at the last start: what follows is this run's

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")  # noqa: SIM115 (kept by the child)
        self.log_offset = out.tell()
        self.proc = subprocess.Popen(
            self.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, preexec_fn=_own_group_dying_with_parent, umask=self.umask,
        )
        out.close()
        self.started_at = time.monotonic()
        self.ready, self.waiting_for = False, "starting"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def lost_bind(self) -> bool:
        """Whether this run of the child could not listen because its address was taken."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return LOST_BIND in f.read().lower()
        except OSError:
            return False

    def kill_leftovers(self) -> None:
        """SIGKILL what is left of a dead child's process group (a hub's pool and receive
        listener die with it, but not at once): nothing of it then holds its ports."""
        if self.proc is not None and not self.alive:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "pid": self.proc.pid if self.proc else None,
            "restarts": self.restarts,
            "ready": self.ready,
            **({} if self.ready else {"waiting_for": self.waiting_for}),
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
    # The ports of the first hub's connectors bound to port 25 (Default, Internet) and 587
    # (Client); 0: the default below, or free.
    smtp_port: int = 0
    client_port: int = 0
    # The fixed defaults of mailyard.site.ports where a port is not given (0); False: free
    # ports throughout (as the tests run sites side by side). A port given or a default that
    # is taken gives way to a free one too.
    default_ports: bool = False


class Site:
    def __init__(self, cfg: SiteConfig) -> None:
        self.cfg = cfg
        self.data_dir = cfg.data_dir.resolve()
        self.children: list[Child] = []
        self.redis: Child | None = None
        self.redis_url = cfg.redis_url or ""
        self.ready = False
        self._stopping = False
        self._supervising = False
        self.ports = site_ports.Ports(cfg.host)
        self.secrets_file = site_secrets.secrets_path(self.data_dir)
        self.secrets: site_secrets.SiteSecrets | None = None
        self.redis_binary = ""
        self.applied: Organization | None = None  # the organization as applied to Redis

    # region: plan

    def _preferred(self, given: int, default: int) -> int:
        return given or (default if self.cfg.default_ports else 0)

    def _take(self, what: str, preferred: int, hosts: list[str] | None = None) -> int:
        port = self.ports.take(preferred, hosts)
        if preferred and port != preferred:
            log.warning("port %d is taken (by another site or program): %s listens on %d instead",
                        preferred, what, port)
        return port

    def _smtp_preferred(self, binding: str) -> int:
        port = _port_of(binding)
        given = {25: self.cfg.smtp_port, 587: self.cfg.client_port}.get(port, 0)
        return self._preferred(given, site_ports.SMTP_DEFAULTS.get(port, 0))

    def plan(self) -> None:
        cfg, logs = self.cfg, self.data_dir / "logs"
        if not cfg.redis_url:
            self.redis = Child("redis", "redis", [], logs / "redis.log", umask=redis_server.UMASK,
                               ports={"redis": cfg.redis_port or self.ports.free()})
            self._build_redis()
            self.redis_binary = redis_server.describe_binary(self.redis.cmd[0])
        # Redis's URL (it holds the password) reaches every child in its environment (see env()).
        for site in cfg.org.sites:
            for server in site.mailbox_servers:
                self.children.append(Child(server, "mailbox", [], logs / f"{server}.log", {"site": site.name},
                                           ports={"api": self.ports.free()}))
        for first_site, site in enumerate(cfg.org.sites):
            bindings = sorted({b for c in cfg.org.receive_connectors if not c.sites or site.name in c.sites
                               for b in c.bindings})
            for i, name in enumerate(hub_names(site.name, cfg.hubs_per_site)):
                # Each hub of the local site gets its own loopback port per configured binding;
                # the first hub of the first site the defaults (2525 for port 25, 2587 for 587).
                first = first_site == 0 and i == 0
                ports = {b: self._take(f"{name} {b}", self._smtp_preferred(b)) if first else self.ports.free()
                         for b in bindings}
                self.children.append(Child(name, "hub", [], logs / f"{name}.log", {"site": site.name},
                                           ports=ports))
        if cfg.internet:
            # The demo Internet: DNS for the outside domains, and their MX hosts on the port
            # the DNS-routed send connectors use (org_to_apply points the organization at both).
            mx = min({c.port for c in cfg.org.send_connectors if c.dns_routing} or {25})
            ports = {"dns": self.ports.free(udp=True),
                     "smtp": self._take("the demo Internet's MX hosts", self._preferred(0, mx), _mx_hosts())}
            self.children.append(Child("internet", "internet", [], logs / "internet.log", ports=ports))
        if cfg.flower:
            self.children.append(Child("flower", "flower", [], logs / "flower.log", ports={
                "http": self._take("Flower", self._preferred(cfg.flower_port, site_ports.FLOWER))}))
        if cfg.viewer:
            self.children.append(Child("viewer", "viewer", [], logs / "viewer.log", ports={
                "http": self._take("the Queue Viewer", self._preferred(cfg.viewer_port, site_ports.VIEWER))}))
        for child in self.children:
            self._build(child)

    def _build_redis(self) -> None:
        assert self.redis is not None
        if self.secrets is None or not self.secrets.redis_password:
            raise SiteError("the site's secrets are not loaded")  # (start() loads them first)
        cfg, password, port = self.cfg, self.secrets.redis_password, self.redis.ports["redis"]
        self.redis_url = redisconn.with_password(f"redis://{cfg.host}:{port}/0", password)
        self.redis.cmd = redis_server.command(self.data_dir / "redis", port, fsync=cfg.fsync, host=cfg.host,
                                              password=password)
        self.redis.endpoints = {"url": redisconn.without_password(self.redis_url)}

    def _build(self, child: Child) -> None:
        """The child's command line and endpoints, from its ports."""
        cfg, host, common = self.cfg, self.cfg.host, ["--data-dir", str(self.data_dir)]
        if child.role == "mailbox":
            port = child.ports["api"]
            child.cmd = mailyard_cmd("mailbox", "serve", "--server", child.name, "--host", host,
                                     "--port", str(port), *common)
            child.endpoints["url"] = f"https://{host}:{port}"
        elif child.role == "hub":
            site = child.endpoints["site"]
            actual = {b: f"{host}:{port}" for b, port in child.ports.items()}
            bind_args = [arg for b, a in actual.items() for arg in ("--bind", f"{b}={a}")]
            enabled = set(connectors_of(cfg.org, site))
            child.cmd = mailyard_cmd("hub", "--site", site, "--name", child.name,
                                     "--concurrency", str(cfg.concurrency), *bind_args, *common)
            child.endpoints["smtp"] = {c.name: actual[c.bindings[0]] for c in cfg.org.receive_connectors
                                       if c.name in enabled and c.bindings}
        elif child.role == "internet":
            dns, smtp = f"{host}:{child.ports['dns']}", child.ports["smtp"]
            mx = [f"{ip}:{smtp}" for ip in _mx_hosts()]
            child.cmd = mailyard_cmd("internet", "serve", "--dns", dns, "--smtp-port", str(smtp),
                                     "--first-ip", FIRST_MX_IP, "--data-dir", str(self.data_dir))
            child.endpoints = {
                "url": f"dns {dns}, MX hosts {_mx_hosts()[0]}-{_mx_hosts()[-1].rpartition('.')[2]}:{smtp}, "
                       f"mail in {self.data_dir / 'internet'}",
                "dns": dns, "mx": mx, "domains": list(DEMO_DOMAINS),
            }
        elif child.role == "flower":
            port = child.ports["http"]
            child.cmd = [sys.executable, "-m", "celery", "-A", "mailyard.flower", "flower",
                         f"--address={host}", f"--port={port}", "--purge_offline_workers=60"]
            child.endpoints = {"url": f"http://{host}:{port}",
                               "logon": f"user and password in {self.secrets_file} [flower]"}
        elif child.role == "viewer":
            # The Queue Viewer: its page, JSON API and /metrics, all behind its token (in the
            # environment, see env_for).
            port = child.ports["http"]
            child.cmd = mailyard_cmd("viewer", "--host", host, "--port", str(port), *common)
            child.endpoints = {"url": f"http://{host}:{port}/", "logon": f"token in {self.secrets_file} [viewer]"}

    def replan(self, child: Child) -> None:
        """Move the child off each of its ports that someone else took (it lost the race to
        bind it), and follow: the organization's MX port, Flower's address for the checks."""
        hosts = _mx_hosts() if child.role == "internet" else [self.cfg.host]
        for key, port in child.ports.items():
            where = hosts if key == "smtp" else [self.cfg.host]
            udp = key == "dns"  # (the DNS server listens on UDP and TCP)
            taken = not site_ports.bindable(port, where) or (
                udp and not site_ports.bindable(port, where, socket.SOCK_DGRAM))
            if taken:
                self.ports.release(port, where)
                child.ports[key] = self.ports.free(where, udp=udp)
                log.warning("%s: port %d was taken before it could listen there; it moves to %d",
                            child.name, port, child.ports[key])
        self._build(child)
        if child.role == "internet":
            self.apply_org()

    # endregion

    def org_to_apply(self) -> Organization:
        org = self.cfg.org
        if self.secrets is not None:
            org, self.secrets = site_secrets.with_site_passwords(org, self.data_dir)
        internet = next((c for c in self.children if c.role == "internet"), None)
        if internet is None:
            return org
        # The DNS-routed send connectors reach the demo Internet: its DNS server, its MX port.
        transport = org.transport.model_copy(update={"dns_servers": [f"{self.cfg.host}:{internet.ports['dns']}"]})
        send = [c.model_copy(update={"port": internet.ports["smtp"]}) if c.dns_routing else c
                for c in org.send_connectors]
        return org.model_copy(update={"transport": transport, "send_connectors": send})

    def apply_org(self) -> None:
        self.applied = self.org_to_apply()
        apply_org(redisconn.connect(self.redis_url), self.applied)

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
        if self.redis:
            log.info("Redis server: %s", self.redis_binary)
            self._start_redis()
        else:
            redis_server.wait_ready(self.redis_url, None, timeout=5)
        self.apply_org()
        env = self.env()
        for child in self.children:
            child.start(self.env_for(child, env))
        self.write_state()
        self.wait_ready()

    def _start_redis(self, attempts: int = 5) -> None:
        assert self.redis is not None
        for attempt in range(attempts):
            self.redis.start(self.env())
            try:
                redis_server.wait_ready(self.redis_url, self.redis.proc)
                self.redis.ready, self.redis.waiting_for = True, ""
                return
            except SiteError:
                self.redis.kill_leftovers()
                if self.cfg.redis_port or attempt == attempts - 1 or not self.redis.lost_bind():
                    raise
                self.replan(self.redis)
                self._build_redis()

    def probes(self) -> Probes:
        flower = next((c for c in self.children if c.role == "flower"), None)
        auth = None
        if flower is not None and self.secrets is not None:
            user, _, password = self.secrets.flower_basic_auth.partition(":")
            auth = (user, password)
        return Probes(redisconn.connect(self.redis_url), self.applied or self.cfg.org,
                      pki.pki_dir(self.data_dir), hubs=[c.name for c in self.children if c.role == "hub"],
                      flower_url=flower.endpoints["url"] if flower else None, flower_auth=auth)

    def check(self, child: Child, probes: Probes) -> None:
        """Look at a child that is not ready yet: ready now? Or did it lose its port to someone
        else (start it again on another)? Raises SiteError when it exited for another reason
        while the site starts; under supervise() that is a crash, restarted there."""
        if not child.alive:
            if child.lost_bind() and child is not self.redis:
                child.kill_leftovers()
                self.replan(child)
                child.start(self.env_for(child, self.env()))
                return
            if not self._supervising:
                raise SiteError(f"{child.name} exited while starting; see {child.log_path}")
            return  # (supervise() restarts it)
        if child.role == "hub" and child.lost_bind() and self._hub_port_taken(child):
            log.warning("%s could not listen on all its addresses; starting it again", child.name)
            _terminate([child])
            child.kill_leftovers()
            self.replan(child)
            child.start(self.env_for(child, self.env()))
            return
        why = probes.check(child.role, child.name, child.proc.pid if child.proc else -1, child.endpoints)
        if why is None:
            child.ready, child.waiting_for = True, ""
            log.info("%s is ready", child.name)
        else:
            child.waiting_for = why

    def _hub_port_taken(self, child: Child) -> bool:
        """One of the hub's addresses is not its own listener's and cannot be bound: taken."""
        from mailyard import registry

        published = next((h.endpoints for h in registry.hubs(redisconn.connect(self.redis_url))
                          if h.name == child.name), {})
        return any(address not in published.values() and site_ports.in_use(address)
                   for address in child.endpoints.get("smtp", {}).values())

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until every child serves what it serves (mailyard.site.readiness)."""
        probes = self.probes()
        deadline = time.monotonic() + timeout
        while True:
            pending = [c for c in self.all_children() if not c.ready]
            if not pending:
                break
            for child in pending:
                self.check(child, probes)
                if child.role == "flower":
                    probes = self.probes()  # (it may have moved to another port)
            if time.monotonic() > deadline:
                raise SiteError(f"not ready after {timeout:.0f}s: " + "; ".join(
                    f"{c.name}: {c.waiting_for}" for c in self.all_children() if not c.ready))
            time.sleep(0.1)
        self.ready = True
        self.write_state()

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
            "redis_server": self.redis_binary,  # which binary runs ("" with --redis-url)
            "processes": [c.describe() for c in self.all_children()],
        }

    def write_state(self) -> None:
        path = self.data_dir / "site.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state(), indent=2))
        os.replace(tmp, path)

    def supervise(self) -> None:
        """Restart children that die, until asked to stop; a restarted child is ready again
        only once it answers (the site's "ready" says so meanwhile)."""
        self._supervising = True
        probes = self.probes()
        while not self._stopping:
            before = [(c.ready, c.proc.pid if c.proc else None) for c in self.all_children()]
            now = time.monotonic()
            for child in self.all_children():
                if self._stopping:
                    break
                if child.alive:
                    if not child.ready:
                        self.check(child, probes)
                    continue
                if child.next_start == 0.0:
                    code = child.proc.returncode if child.proc else None
                    child.ready, child.waiting_for = False, f"exited with status {code}"
                    child.kill_leftovers()
                    if child.lost_bind() and child is not self.redis:
                        self.replan(child)
                    # A child that ran for a while gets a quick restart; a crash loop backs off.
                    if now - child.started_at > 60:
                        child.backoff = 1.0
                    child.next_start = now + child.backoff
                    log.warning("%s (%s) exited with status %s; restarting in %.0fs",
                                child.name, child.role, code, child.backoff)
                elif now >= child.next_start:
                    child.start(self.env_for(child, self.env()))
                    child.restarts += 1
                    child.backoff = min(child.backoff * 2, MAX_BACKOFF_S)
                    child.next_start = 0.0
                    if child is self.redis:
                        try:
                            redis_server.wait_ready(self.redis_url, child.proc)
                        except SiteError as exc:
                            log.error("%s", exc)
                if child.role == "flower":
                    probes = self.probes()
            self.ready = all(c.ready for c in self.all_children())
            if before != [(c.ready, c.proc.pid if c.proc else None) for c in self.all_children()]:
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
        self.ports.close()
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


def _port_of(binding: str) -> int:
    """The port of a configured binding ("0.0.0.0:25", "[::]:587")."""
    return int(binding.rpartition(":")[2])


def _mx_hosts() -> list[str]:
    """The loopback addresses of the demo Internet's MX hosts, one per demo domain."""
    first = ipaddress.IPv4Address(FIRST_MX_IP)
    return [str(first + i) for i in range(len(DEMO_DOMAINS))]

