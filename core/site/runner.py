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

With ``--redis-replicas N`` (N >= 1) the site's Redis is a replicated group instead
(mailyard.site.redis_group, mailyard.site.replicas): a primary, N replicas and three Sentinels
on loopback, each with its own directory under ``<data dir>/redis``, all with the site's one
Redis password. Every child gets the group's ``redis+sentinel://`` URL and follows a failover
by itself. The runner supervises each member like any child: a dead data node is started
again in the role the Sentinels' view gives it (``start_role``: never as an empty primary;
while it must wait, it says why in its ``waiting_for``), so a killed primary, replaced by a
promoted replica, comes back as a replica. The members' ports are kept in site.json
(``redis_group``) and reused by the next start from the same data directory.
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
from mailyard.site import edge as demo_edge
from mailyard.site import ports as site_ports
from mailyard.site import redis_group, redis_server, replicas
from mailyard.site import secrets as site_secrets
from mailyard.site.readiness import Probes, connectors_of
from mailyard.site.redis_group import Layout, Primary, ReplicaOf, Wait

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
    # >= 1: a replicated Redis under three Sentinels instead of one Redis (see the module's docstring)
    redis_replicas: int = 0
    fsync: str = "always"
    flower: bool = True
    flower_port: int = 0
    viewer: bool = True
    viewer_port: int = 0
    concurrency: int = 2
    host: str = "127.0.0.1"
    internet: bool = True
    # The demo's Edge Transport server (mailyard.site.edge), with its own Redis
    edge: bool = False
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
        # The replicated Redis (--redis-replicas): its data nodes, then its Sentinels
        self.layout: Layout | None = None
        self.nodes: list[Child] = []
        self.sentinels: list[Child] = []
        self._group_looked = 0.0
        self._named_primary: int | None = None
        self.redis_url = cfg.redis_url or ""
        self.ready = False
        self._stopping = False
        self._supervising = False
        self.ports = site_ports.Ports(cfg.host)
        self.secrets_file = site_secrets.secrets_path(self.data_dir)
        self.secrets: site_secrets.SiteSecrets | None = None
        self.redis_binary = ""
        self.applied: Organization | None = None  # the organization as applied to Redis
        self.dns_records: list[str] = []  # the demo Internet's records of the organization (the Edge's)

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
        if cfg.redis_replicas and cfg.redis_url:
            raise SiteError("--redis-replicas starts the site's own replicated Redis; it cannot be combined "
                            "with --redis-url (an external Redis: replicate it yourself and pass its "
                            "redis+sentinel:// URL)")
        if cfg.redis_replicas and cfg.redis_port:
            raise SiteError("--redis-port is the port of the single embedded Redis; with --redis-replicas the "
                            "group's members take free ports (site.json lists them) and keep them")
        if cfg.redis_replicas:
            self._plan_group(logs)
        elif not cfg.redis_url:
            replicas.refuse_single_over_group(self.data_dir / "redis")
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
        internet_port = None
        if cfg.internet:
            # The demo Internet: DNS for the outside domains, and their MX hosts on the port
            # the DNS-routed send connectors use (org_to_apply points the organization at both);
            # the Edge, the organization's MX host, listens on that port too.
            mx = min({c.port for c in cfg.org.send_connectors if c.dns_routing} or {25})
            hosts = _mx_hosts() + ([demo_edge.ADDRESS] if cfg.edge else [])
            # (the port the Edge had, when it has a subscription: it names the port)
            kept = self._kept_edge_ports()[0] if cfg.edge else 0
            internet_port = self._take("the demo Internet's MX hosts", kept or self._preferred(0, mx), hosts)
            ports = {"dns": self.ports.free(udp=True), "smtp": internet_port}
            self.children.append(Child("internet", "internet", [], logs / "internet.log", ports=ports))
        if cfg.edge:
            self._plan_edge(logs, internet_port)
        if cfg.flower:
            self.children.append(Child("flower", "flower", [], logs / "flower.log", ports={
                "http": self._take("Flower", self._preferred(cfg.flower_port, site_ports.FLOWER))}))
        if cfg.viewer:
            self.children.append(Child("viewer", "viewer", [], logs / "viewer.log", ports={
                "http": self._take("the Queue Viewer", self._preferred(cfg.viewer_port, site_ports.VIEWER))}))
        for child in self.children:
            self._build(child)

    def _plan_edge(self, logs: Path, internet_port: int | None) -> None:
        """The Edge and its Redis; the ports its subscription has, when it has one and they are free."""
        kept_smtp, kept_sync = self._kept_edge_ports()
        smtp = internet_port or self._take("the Edge's SMTP", kept_smtp or self._preferred(0, site_ports.SMTP),
                                           [demo_edge.ADDRESS])
        sync = self._take("the Edge's EdgeSync", kept_sync or self._preferred(0, demo_edge.SYNC_PORT))
        site = demo_edge.site_of(self.cfg.org)
        self.children.append(Child("edge-redis", "edge-redis", [], logs / "edge-redis.log", {"site": site},
                                   umask=redis_server.UMASK, ports={"redis": self.ports.free()}))
        self.children.append(Child(demo_edge.NAME.lower(), "edge", [], logs / "edge.log", {"site": site},
                                   ports={"smtp": smtp, "sync": sync}))

    def _kept_edge_ports(self) -> tuple[int, int]:
        """The SMTP and EdgeSync ports of the Edge's subscription (0, 0 without one)."""
        home = demo_edge.EdgeHome(demo_edge.edge_dir(self.data_dir))
        before = home.config() if home.exists() else {}
        smtp, sync = (_port_of(before[k]) if before.get(k) else 0 for k in ("smtp", "sync"))
        return smtp, sync

    @property
    def edge_redis_url(self) -> str:
        child = next(c for c in self.children if c.role == "edge-redis")
        if self.secrets is None:
            raise SiteError("the site's secrets are not loaded")
        return redisconn.with_password(f"redis://{self.cfg.host}:{child.ports['redis']}/0",
                                       self.secrets.edge_redis_password)

    def _build_redis(self) -> None:
        assert self.redis is not None
        if self.secrets is None or not self.secrets.redis_password:
            raise SiteError("the site's secrets are not loaded")  # (start() loads them first)
        cfg, password, port = self.cfg, self.secrets.redis_password, self.redis.ports["redis"]
        self.redis_url = redisconn.with_password(f"redis://{cfg.host}:{port}/0", password)
        self.redis.cmd = redis_server.command(self.data_dir / "redis", port, fsync=cfg.fsync, host=cfg.host,
                                              password=password)
        self.redis.endpoints = {"url": redisconn.without_password(self.redis_url)}

    # region: the replicated Redis (--redis-replicas)

    def _plan_group(self, logs: Path) -> None:
        """The group's members and ports: those of the last run from this data directory
        (site.json), so that each finds its data and the Sentinels know it, else free ones."""
        if self.secrets is None or not self.secrets.redis_password:
            raise SiteError("the site's secrets are not loaded")  # (start() loads them first)
        cfg, root = self.cfg, self.data_dir / "redis"
        redis_server.make_data_dir(root)
        if replicas.adopt_single_redis(root):
            log.warning("the site's Redis data (%s) moved to %s: that node starts as the group's primary",
                        root / "appendonlydir", root / "node-0")
        old_nodes, old_sentinels = replicas.previous_ports(self.data_dir)
        node_ports = [self._keep_port(replicas.node_name(i), old_nodes[i] if i < len(old_nodes) else 0, move=False)
                      for i in range(1 + cfg.redis_replicas)]
        sentinel_ports = [self._keep_port(replicas.sentinel_name(j), old_sentinels[j] if j < len(old_sentinels) else 0,
                                          move=True) for j in range(redis_group.SENTINELS)]
        self.layout = layout = Layout(root, node_ports, sentinel_ports, host=cfg.host)
        for i, port in enumerate(node_ports):
            self.nodes.append(Child(replicas.node_name(i), "redis", [], logs / f"{replicas.node_name(i)}.log",
                                    {"url": f"redis://{cfg.host}:{port}/0"}, ports={"redis": port},
                                    umask=redis_server.UMASK))
        for j, port in enumerate(sentinel_ports):
            self.sentinels.append(Child(replicas.sentinel_name(j), "sentinel", [],
                                        logs / f"{replicas.sentinel_name(j)}.log",
                                        {"url": f"{cfg.host}:{port}", "monitors": layout.service},
                                        ports={"sentinel": port}, umask=redis_server.UMASK))
        self.redis_url = layout.url(self.secrets.redis_password)
        self.redis_binary = redis_server.describe_binary(redis_server.find_binary())

    def _keep_port(self, what: str, previous: int, *, move: bool) -> int:
        if not previous:
            return self.ports.free()
        port = self.ports.take(previous)
        if port != previous:
            if not move:
                self.ports.release(port)
                raise SiteError(
                    f"port {previous} of {what} (the group's Sentinels know it there) is taken by another program "
                    f"or site; free it and start again (or remove {self.data_dir / 'redis'} to start a new, empty "
                    "group)")
            log.warning("port %d of %s is taken (by another site or program): it listens on %d instead",
                        previous, what, port)
        return port

    def _member_index(self, child: Child) -> int:
        return (self.nodes if child.role == "redis" else self.sentinels).index(child)

    def _is_member(self, child: Child) -> bool:
        return any(child is c for c in (*self.nodes, *self.sentinels))

    def _build_node(self, child: Child) -> str | None:
        """The node's command line for the role it must start in now; or why it must wait."""
        assert self.layout is not None and self.secrets is not None and self.secrets.redis_password
        i = self._member_index(child)
        role = redis_group.start_role(self.layout, i, self.secrets.redis_password)
        if isinstance(role, Wait):
            return role.reason
        child.cmd = redis_group.node_command(self.layout, i, role, password=self.secrets.redis_password,
                                             fsync=self.cfg.fsync)
        child.endpoints["starts_as"] = replicas.PRIMARY if isinstance(role, Primary) else (
            f"replica of {self._name_of(role)}")
        return None

    def _name_of(self, role: ReplicaOf) -> str:
        assert self.layout is not None
        i = self.layout.node_of(role.host, role.port)
        return replicas.node_name(i) if i is not None else f"{role.host}:{role.port}"

    def _build_sentinel(self, child: Child) -> None:
        assert self.layout is not None and self.secrets is not None and self.secrets.redis_password
        j = self._member_index(child)
        # (--port: the one the site has for it now, over the one its sentinel.conf may have)
        child.cmd = [*redis_group.sentinel_command(self.layout, j, password=self.secrets.redis_password),
                     "--port", str(self.layout.sentinel_ports[j])]

    def _start_group(self, timeout: float = 60.0) -> None:
        """Start the data nodes (the primary first, each once it answers), then the Sentinels,
        and wait until the Sentinels name a primary that takes writes (a replica connected)."""
        assert self.layout is not None and self.secrets is not None
        layout, password, env = self.layout, self.secrets.redis_password, self.env()
        new_group = not any((layout.sentinel_dir(j) / redis_group.SENTINEL_CONF).exists()
                            for j in range(len(self.sentinels)))
        deadline = time.monotonic() + timeout
        waiting = list(self.nodes)
        while waiting:
            roles = {id(c): redis_group.start_role(layout, self._member_index(c), password) for c in waiting}
            ready_to_start = [c for c in waiting if not isinstance(roles[id(c)], Wait)]
            if not ready_to_start:
                if time.monotonic() > deadline:
                    raise SiteError("; ".join(f"{c.name}: {getattr(roles[id(c)], 'reason', '')}" for c in waiting))
                time.sleep(0.2)
                continue
            child = next((c for c in ready_to_start if isinstance(roles[id(c)], Primary)), ready_to_start[0])
            for attempt in range(5):
                reason = self._build_node(child)
                if reason is not None:
                    break  # (the next round waits for it)
                child.start(env)
                try:
                    redis_server.wait_ready(layout.node_url(self._member_index(child), password), child.proc,
                                            timeout=max(5.0, deadline - time.monotonic()))
                    waiting.remove(child)
                    break
                except SiteError:
                    child.kill_leftovers()
                    # A new group's node that lost its free port to someone: another one (the
                    # Sentinels know no node yet). An existing group's keeps its port.
                    if not (new_group and child.lost_bind()) or attempt == 4:
                        raise SiteError(f"{child.name} did not start; see {child.log_path}") from None
                    self.ports.release(child.ports["redis"])
                    port = self.ports.free()
                    layout.node_ports[self._member_index(child)] = child.ports["redis"] = port
                    child.endpoints["url"] = f"redis://{self.cfg.host}:{port}/0"
        for child in self.sentinels:
            self._build_sentinel(child)
            child.start(env)
        while True:
            for child in self.sentinels:
                if not child.alive and child.lost_bind() and time.monotonic() < deadline:
                    j = self._member_index(child)
                    self.ports.release(layout.sentinel_ports[j])
                    layout.sentinel_ports[j] = child.ports["sentinel"] = self.ports.free()
                    child.endpoints["url"] = f"{self.cfg.host}:{layout.sentinel_ports[j]}"
                    self.redis_url = layout.url(password)
                    self._build_sentinel(child)
                    child.start(env)
                elif not child.alive:
                    raise SiteError(f"{child.name} exited while starting; see {child.log_path}")
            view = replicas.look(layout, password)
            primary = view.named_primary()
            if primary is not None and view.nodes[primary].replication == replicas.PRIMARY \
                    and view.nodes[primary].online_replicas:
                return
            if time.monotonic() > deadline:
                raise SiteError(f"the replicated Redis did not get a writable primary within {timeout:.0f}s: "
                                + "; ".join(f"{c.name}: {p}" for c, p in self._group_problems(view) if p))
            time.sleep(0.1)

    def _group_problems(self, view: replicas.GroupView) -> list[tuple[Child, str | None]]:
        running = [i for i, c in enumerate(self.nodes) if c.alive]
        return ([(c, view.node_problem(i, running)) for i, c in enumerate(self.nodes)]
                + [(c, view.sentinel_problem(j, running)) for j, c in enumerate(self.sentinels)])

    def _refresh_group(self, every: float = 0.5) -> None:
        """Read the group live (at most every ``every`` s): each running member's readiness,
        and each node's replication (primary, replica)."""
        if self.layout is None or time.monotonic() - self._group_looked < every:
            return
        assert self.secrets is not None
        self._group_looked = time.monotonic()
        view = replicas.look(self.layout, self.secrets.redis_password)
        primary = view.named_primary()
        if primary is not None and primary != self._named_primary:
            if self._named_primary is not None:
                log.warning("the Sentinels now name %s primary (it was %s)", replicas.node_name(primary),
                            replicas.node_name(self._named_primary))
            self._named_primary = primary
        for child, problem in self._group_problems(view):
            if child.role == "redis":
                node = view.nodes[self._member_index(child)]
                if node.replication:
                    child.endpoints["replication"] = node.replication
                else:
                    child.endpoints.pop("replication", None)
            else:
                child.endpoints["primary"] = view.node_of_address(view.sentinels[self._member_index(child)].primary)
            if not child.alive:
                continue
            if problem is None and not child.ready:
                log.info("%s is ready%s", child.name,
                         f" ({child.endpoints['replication']})" if child.role == "redis" else "")
            elif problem is not None and child.ready:
                log.warning("%s is not ready: %s", child.name, problem)
            child.ready, child.waiting_for = problem is None, problem or ""

    # endregion

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
            org = (demo_edge.without_internet_connectors(cfg.org, None) if cfg.edge
                   else demo_edge.with_internet_connectors(cfg.org))
            enabled = set(connectors_of(org, site))
            child.cmd = mailyard_cmd("hub", "--site", site, "--name", child.name,
                                     "--concurrency", str(cfg.concurrency), *bind_args, *common)
            child.endpoints["smtp"] = {c.name: actual[c.bindings[0]] for c in org.receive_connectors
                                       if c.name in enabled and c.bindings}
        elif child.role == "internet":
            dns, smtp = f"{host}:{child.ports['dns']}", child.ports["smtp"]
            mx = [f"{ip}:{smtp}" for ip in _mx_hosts()]
            records = [arg for record in self.dns_records for arg in ("--record", record)]
            child.cmd = mailyard_cmd("internet", "serve", "--dns", dns, "--smtp-port", str(smtp),
                                     "--first-ip", FIRST_MX_IP, *records, "--data-dir", str(self.data_dir))
            child.endpoints = {
                "url": f"dns {dns}, MX hosts {_mx_hosts()[0]}-{_mx_hosts()[-1].rpartition('.')[2]}:{smtp}, "
                       f"mail in {self.data_dir / 'internet'}",
                "dns": dns, "mx": mx, "domains": list(DEMO_DOMAINS),
                # The organization's domains, whose MX the demo DNS points at the Edge
                **({"organization": list(cfg.org.accepted_domains)} if cfg.edge else {}),
            }
        elif child.role == "edge-redis":
            assert self.secrets is not None
            child.cmd = redis_server.command(demo_edge.edge_dir(self.data_dir) / "redis", child.ports["redis"],
                                             fsync=cfg.fsync, host=host, password=self.secrets.edge_redis_password)
            child.endpoints["url"] = redisconn.without_password(self.edge_redis_url)
        elif child.role == "edge":
            at, sync = f"{demo_edge.ADDRESS}:{child.ports['smtp']}", f"{host}:{child.ports['sync']}"
            child.cmd = mailyard_cmd("edge", "run", "--data-dir", str(demo_edge.edge_dir(self.data_dir)))
            child.endpoints.update({"url": f"SMTP {at}, EdgeSync https://{sync}", "edge_smtp": at, "edge_sync": sync})
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
        hosts = {"internet": _mx_hosts(), "edge": [demo_edge.ADDRESS]}.get(child.role, [self.cfg.host])
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
        if child.role == "edge":  # (its subscription names its addresses)
            demo_edge.ensure_subscribed(redisconn.connect(self.redis_url), self.data_dir,
                                        smtp=child.endpoints["edge_smtp"], sync=child.endpoints["edge_sync"])

    # endregion

    def org_to_apply(self) -> Organization:
        org = self.cfg.org if self.cfg.edge else demo_edge.with_internet_connectors(self.cfg.org)
        if self.secrets is not None:
            org, self.secrets = site_secrets.with_site_passwords(org, self.data_dir)
        internet = next((c for c in self.children if c.role == "internet"), None)
        if internet is None:
            return demo_edge.without_internet_connectors(org, None) if self.cfg.edge else org
        # The DNS-routed send connectors reach the demo Internet: its DNS server, its MX port.
        if self.cfg.edge:
            org = demo_edge.without_internet_connectors(org, internet.ports["smtp"])
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
        """``env`` with the secrets this child needs: Flower its logon, the viewer its tokens;
        the Edge its own Redis and never the organization's."""
        if child.role in ("edge", "edge-redis"):
            # Nothing of the site's settings (its Redis, its data or pki directory, a password
            # file the operator's shell names): the Edge's own, on its command line, only.
            env = {k: v for k, v in env.items() if not k.startswith("MAILYARD_")}
            return {**env, "MAILYARD_EDGE_REDIS_URL": self.edge_redis_url} if child.role == "edge" else env
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
        elif self.layout is not None:
            log.info("Redis server: %s, a primary, %d replica(s) and %d Sentinels", self.redis_binary,
                     len(self.nodes) - 1, len(self.sentinels))
            self._start_group()
        else:
            redis_server.wait_ready(self.redis_url, None, timeout=5)
        self.apply_org()
        if self.cfg.edge:
            self._subscribe_edge()
        env = self.env()
        for child in self.children:
            if not child.alive:
                child.start(self.env_for(child, env))
        self.write_state()
        self.wait_ready()

    def _subscribe_edge(self) -> None:
        """Start the Edge's Redis, subscribe the Edge (mailyard.site.edge) and publish what the
        demo Internet's DNS says of the organization (the Edge as its MX host, its DKIM key)."""
        edge_redis = next(c for c in self.children if c.role == "edge-redis")
        edge = next(c for c in self.children if c.role == "edge")
        edge_redis.start(self.env_for(edge_redis, self.env()))
        redis_server.wait_ready(self.edge_redis_url, edge_redis.proc)
        r = redisconn.connect(self.redis_url)
        demo_edge.ensure_subscribed(r, self.data_dir, smtp=edge.endpoints["edge_smtp"],
                                    sync=edge.endpoints["edge_sync"])
        internet = next((c for c in self.children if c.role == "internet"), None)
        if internet is not None:
            dkim = demo_edge.ensure_dkim_key(r, self.cfg.org)
            self.dns_records = demo_edge.dns_records(self.cfg.org, demo_edge.ADDRESS, dkim)
            self._build(internet)

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
                      flower_url=flower.endpoints["url"] if flower else None, flower_auth=auth,
                      edge_redis_url=self.edge_redis_url if self.cfg.edge else None)

    def check(self, child: Child, probes: Probes) -> None:
        """Look at a child that is not ready yet: ready now? Or did it lose its port to someone
        else (start it again on another)? Raises SiteError when it exited for another reason
        while the site starts; under supervise() that is a crash, restarted there."""
        if self._is_member(child):  # (a member of the replicated Redis: see _refresh_group)
            if not child.alive and not self._supervising:
                raise SiteError(f"{child.name} exited while starting; see {child.log_path}")
            return
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
            self._refresh_group()
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
        return ([self.redis] if self.redis else []) + self.nodes + self.sentinels + self.children

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
            # --redis-replicas: the members' ports, kept for the next start (see replicas)
            **({replicas.STATE_KEY: replicas.state_of(self.layout)} if self.layout else {}),
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
            before = [c.describe() for c in self.all_children()]
            self._refresh_group()
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
                    if child.lost_bind() and child is not self.redis and not self._is_member(child):
                        self.replan(child)
                    # A child that ran for a while gets a quick restart; a crash loop backs off.
                    if now - child.started_at > 60:
                        child.backoff = 1.0
                    child.next_start = now + child.backoff
                    log.warning("%s (%s) exited with status %s; restarting in %.0fs",
                                child.name, child.role, code, child.backoff)
                elif now >= child.next_start:
                    if child in self.nodes:
                        # In the role the Sentinels' view gives it now; or not yet (say why, and
                        # ask again in a moment: no growing pause, a failover takes seconds).
                        reason = self._build_node(child)
                        if reason is not None:
                            if child.waiting_for != reason:
                                log.warning("%s: %s", child.name, reason)
                            child.waiting_for, child.next_start = reason, now + 1.0
                            continue
                        log.info("%s starts as %s", child.name, child.endpoints.get("starts_as"))
                    elif child in self.sentinels:
                        self._build_sentinel(child)
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
            if before != [c.describe() for c in self.all_children()]:
                self.write_state()
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop children in reverse order of need: Flower, the viewer and hubs, mailbox servers, Redis."""
        self._stopping = True
        first = ("flower", "viewer", "hub", "internet", "edge")
        order = [c for c in self.children if c.role in first]
        order += [c for c in self.children if c.role not in first]
        _terminate(order)
        # The Sentinels before the data nodes (they would otherwise fail over a stopping primary)
        _terminate(self.sentinels)
        _terminate(self.nodes)
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

