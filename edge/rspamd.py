"""The Edge's content filter server: Debian's rspamd, started by ``mailyard edge run`` on a
free loopback port with a configuration of its own (``<data-dir>/rspamd``): the normal worker
only, rspamd's own rules (regular expressions, Lua rules and their scores), no module that
asks anything of the network (no fuzzy storage, no remote block lists or maps), DNS only to
the organization's DNS servers. The Edge's transport talks to it over its HTTP protocol
(``POST /checkv2``: mailyard.hub.content_filter)."""

from __future__ import annotations

import grp
import ipaddress
import json
import logging
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx

from mailyard import pki, processes

log = logging.getLogger("mailyard.edge.rspamd")

CONFIG = """# Written by mailyard edge run (or edge rspamd): rspamd for the Edge's content filter
options {{
    pidfile = {pidfile};
    dns {{ nameserver = [{dns}]; timeout = 1s; retransmits = 1; }}
    local_addrs = [];
}}
logging {{ {logging}; level = "warning"; }}
worker "normal" {{
    bind_socket = {bind};
    count = 1;
    task_timeout = 8s;
}}
actions {{ reject = 15; add_header = 6; greylist = 4; }}
.include(try=true) "/etc/rspamd/groups.conf"
lua = "/usr/share/rspamd/rules/rspamd.lua";
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary() -> str | None:
    return shutil.which("rspamd")


USER = "_rspamd"  # the user Debian's package makes: rspamd runs as it, never as root


def nameserver(value: str) -> str:
    """A DNS server as rspamd's configuration takes it, ``IP:PORT`` (``[IPv6]:PORT``), quoted;
    anything else is refused (it is written into a configuration file)."""
    host, sep, port = value.rpartition(":")
    if not sep or (":" in host and not host.startswith("[")):  # (no port: "10.0.0.53", "2001:db8::53")
        host, port = value, "53"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"{value!r} is not a DNS server address (IP:PORT)") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} has no port rspamd can use")
    shown = f"[{address}]" if address.version == 6 else str(address)
    return json.dumps(f"{shown}:{port}")


class Rspamd:
    """One rspamd of an Edge; ``url`` once started."""

    def __init__(self, data_dir: Path, dns_servers: list[str], host: str = "127.0.0.1", *,
                 console: bool = False) -> None:
        self.dir = Path(data_dir) / "rspamd"
        self.console = console  # its log on stderr (a service of its own), else in its directory
        self.dns = [nameserver(d) for d in dns_servers or ["127.0.0.1:53"]]
        self.host = host
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """Its configuration written (on ``port``, a free one if 0); the command that runs it
        in the foreground."""
        path = binary()
        if path is None:
            raise FileNotFoundError("rspamd is not installed")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.port = self.port or _free_port()
        conf = self.dir / "rspamd.conf"
        bind = json.dumps(f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}")
        logging_to = ('type = "console"' if self.console
                      else f'type = "file"; filename = {json.dumps(str(self.dir / "rspamd.log"))}')
        text = CONFIG.format(pidfile=json.dumps(str(self.dir / "rspamd.pid")), bind=bind, dns=", ".join(self.dns),
                             logging=logging_to)
        # The directory and everything in it stay the Edge's (root's): rspamd reads its
        # configuration, and writes its log and pid file, as root before its workers drop to
        # _rspamd, which may write nothing here (a worker taken over by a message could
        # otherwise plant a link that the next start follows). Replaced, never written through.
        pki.write_private(conf, text.encode())
        return [path, "-f", *self._user(), "-c", str(conf)]

    @staticmethod
    def environment() -> dict[str, str]:
        """rspamd's environment: nothing of the Edge's (its Redis URL is in it)."""
        return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8"}

    def start(self, timeout: float = 60.0) -> Rspamd:
        # (it dies with the Edge: a daemon left behind by a killed Edge would hold its port)
        self.proc = subprocess.Popen(self.command(), env=self.environment(), preexec_fn=processes.die_with_parent,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rspamd exited with status {self.proc.returncode} (see {self.dir}/rspamd.log)")
            try:
                if httpx.get(self.url + "/ping", timeout=2, trust_env=False).text.strip() == "pong":
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"rspamd did not answer on {self.url} within {timeout:.0f} s")

    def _user(self) -> list[str]:
        """As root, rspamd's workers run as its own user (it owns nothing of the Edge's), as
        root only where there is none (with a warning: rspamd then needs --insecure)."""
        if os.geteuid() != 0:
            return []
        try:
            account = pwd.getpwnam(USER)
        except KeyError:
            log.warning("there is no user %s: rspamd runs as root", USER)
            return ["-u", "root", "-g", "root", "--insecure"]
        return ["-u", USER, "-g", grp.getgrgid(account.pw_gid).gr_name]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
