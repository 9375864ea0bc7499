"""The ports of a local site: the fixed defaults a person can remember when they are free,
else free ones (the runner prints which).

Two sites on one machine must not end up on one port. A port that another program listens on
is seen by trying to bind it. Two ``mailyard site up`` starting at the same moment would both
see a default port free, so a site also claims each default port it takes with a lock file
(``flock``, per user, held while the site runs and released by the kernel when it dies): the
second site then takes a free port instead. A free port handed out here can still be taken
by someone else before the child binds it; the runner starts that child again on another
(see ``lost_race`` in mailyard.site.runner).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

# The defaults (README, "Run the demo site"). The Internet's MX hosts take the port of the
# organization's DNS-routed send connectors (2525 in deploy/contoso.toml).
SMTP = 2525  # the Default and Internet receive connectors (configured 0.0.0.0:25)
CLIENT = 2587  # the Client receive connector (configured 0.0.0.0:587)
VIEWER = 8080
FLOWER = 5555
SMTP_DEFAULTS = {25: SMTP, 587: CLIENT}  # configured port -> local default


def lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"mailyard-ports-{os.getuid()}"


def bindable(port: int, hosts: Iterable[str], kind: int = socket.SOCK_STREAM) -> bool:
    """Whether a server could listen on ``port`` at every one of ``hosts`` now (with
    SO_REUSEADDR, as servers set it: a port in TIME_WAIT counts as free)."""
    for host in hosts:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Ports:
    """Hands out the ports of one site: never one twice, a default only when it is free and
    no other site of this user claims it."""

    def __init__(self, host: str = "127.0.0.1", *, locks: Path | None = None) -> None:
        self.host = host
        self.locks = locks or lock_dir()
        self.handed: set[tuple[str, int]] = set()  # (host, port)
        self._claims: dict[int, int] = {}  # port -> the fd of its lock file

    def free(self, hosts: Iterable[str] | None = None, *, udp: bool = False) -> int:
        """A port free at every one of ``hosts`` (default: the site's host), TCP (and UDP)."""
        where = list(hosts or [self.host])
        while True:
            port = free_port(where[0])
            if not self._handed(port, where) and bindable(port, where[1:]) and (
                    not udp or bindable(port, where, socket.SOCK_DGRAM)):
                self.handed.update((host, port) for host in where)
                return port

    def take(self, preferred: int, hosts: Iterable[str] | None = None) -> int:
        """``preferred`` when it is free and unclaimed (0: no preference), else a free port."""
        where = list(hosts or [self.host])
        if preferred and not self._handed(preferred, where) and self._claim(preferred):
            if bindable(preferred, where):
                self.handed.update((host, preferred) for host in where)
                return preferred
            self.release(preferred)  # another program listens there
        return self.free(where)

    def _handed(self, port: int, hosts: Iterable[str]) -> bool:
        return any((host, port) in self.handed for host in hosts)

    def release(self, port: int, hosts: Iterable[str] = ()) -> None:
        """A child moved off ``port`` at ``hosts``: give up the claim on it if no other child has it."""
        self.handed.difference_update((host, port) for host in hosts)
        if any(p == port for _, p in self.handed):
            return
        fd = self._claims.pop(port, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        self.handed.clear()
        for port in list(self._claims):
            self.release(port)

    def _claim(self, port: int) -> bool:
        if port in self._claims:
            return True
        try:
            self.locks.mkdir(mode=0o700, exist_ok=True)
            info = self.locks.lstat()
            # Another user's folder (or a link) in /tmp: claim nothing, binding still decides.
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                return True
            fd = os.open(self.locks / f"{port}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False  # another running site of this user has it
        self._claims[port] = fd
        return True


def in_use(address: str) -> bool:
    """Whether ``host:port`` is taken by some listener (not bindable now)."""
    host, _, port = address.rpartition(":")
    with contextlib.suppress(ValueError):
        return not bindable(int(port), [host.strip("[]")])
    return False
