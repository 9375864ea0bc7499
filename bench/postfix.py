"""A private Postfix instance on loopback for the benchmark: its own configuration and queue
directories, relaying everything to the benchmark's sink, with its queue files fsynced (as
Postfix always does). Needs Debian's postfix package and root (Postfix drops privileges)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from mailyard.site.redis_server import free_port


class Postfix:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "conf"
        self.queue = root / "queue"
        self.data = root / "data"
        self.port = free_port()

    def _postfix(self, *args: str) -> None:
        # postfix(1) reports to syslog, or to a terminal: `script` gives it one, so that a
        # failure comes with its reason.
        command = " ".join(["postfix", "-c", str(self.conf), *args])
        done = subprocess.run(["script", "-qc", command, "/dev/null"], capture_output=True, text=True)
        if done.returncode != 0 or "fatal" in done.stdout:
            raise RuntimeError(f"{command}: {done.stdout.strip()}")

    def start(self, *, relay_to: tuple[str, int]) -> None:
        for d in (self.conf, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.root, self.root.parent):  # Postfix's daemons must be able to get in
            d.chmod(0o755)
        shutil.chown(self.data, "postfix")
        master = Path("/etc/postfix/master.cf").read_text().splitlines()
        master = [f"127.0.0.1:{self.port}      inet  n       -       y       -       -       smtpd"
                  if line.startswith("smtp ") and " inet " in line else line for line in master]
        (self.conf / "master.cf").write_text("\n".join(master) + "\n")
        host, port = relay_to
        (self.conf / "main.cf").write_text("\n".join([
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue}",
            f"data_directory = {self.data}",
            "mail_owner = postfix",
            "myhostname = postfix.bench",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "mydestination =",
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks, reject",
            f"relayhost = [{host}]:{port}",
            "default_destination_concurrency_limit = 20",
            "smtp_connection_cache_on_demand = yes",
            "default_process_limit = 200",
            f"maillog_file = {self.root}/maillog",
            f"maillog_file_prefixes = {self.root}",
            "biff = no",
            "smtpd_banner = $myhostname ESMTP",
            "",
        ]))
        self._postfix("check")
        self._postfix("start")
        self.master_pid = int((self.data / "master.lock").read_text().split()[0])

    def stop(self) -> None:
        try:
            self._postfix("stop")
        except (RuntimeError, FileNotFoundError):
            pass
