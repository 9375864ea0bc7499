"""A private Postfix instance on loopback for the benchmark: its own configuration and queue
directories, with its queue files fsynced (as Postfix always does), either relaying
everything to the benchmark's sink (``start(relay_to=...)``) or delivering into Maildirs of
its own (``start(maildirs=[...])``: ``virtual_mailbox_domains``, ``virtual_mailbox_maps`` and
the ``virtual(8)`` delivery agent, which fsyncs each message file before it renames it into
``new/``, as Mailyard's mailbox server does). Needs Debian's postfix package and root
(Postfix drops privileges)."""

from __future__ import annotations

import pwd
import shutil
import subprocess
from pathlib import Path

from mailyard.site.redis_server import free_port

MAILDIR_USER = "nobody"  # virtual(8) writes the Maildirs as this user (virtual_uid_maps)


class Postfix:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "conf"
        self.queue = root / "queue"
        self.data = root / "data"
        self.mail = root / "mail"  # virtual_mailbox_base: one Maildir per address, named by it
        self.port = free_port()

    def _postfix(self, *args: str) -> None:
        # postfix(1) reports to syslog, or to a terminal: `script` gives it one, so that a
        # failure comes with its reason.
        command = " ".join(["postfix", "-c", str(self.conf), *args])
        done = subprocess.run(["script", "-qc", command, "/dev/null"], capture_output=True, text=True)
        if done.returncode != 0 or "fatal" in done.stdout:
            raise RuntimeError(f"{command}: {done.stdout.strip()}")

    def inbox(self, address: str) -> Path:
        """The ``new/`` directory of ``address``'s Maildir (``start(maildirs=...)``)."""
        return self.mail / address / "new"

    def queue_empty(self) -> bool:
        """Nothing in Postfix's queue: every delivery and retry is over."""
        for name in ("maildrop", "incoming", "active", "deferred", "hold"):
            directory = self.queue / name
            if directory.is_dir() and any(p.is_file() for p in directory.rglob("*")):
                return False
        return True

    def start(self, *, relay_to: tuple[str, int] | None = None, maildirs: tuple[str, ...] = ()) -> None:
        for d in (self.conf, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.root, self.root.parent):  # Postfix's daemons must be able to get in
            d.chmod(0o755)
        shutil.chown(self.data, "postfix")
        master = Path("/etc/postfix/master.cf").read_text().splitlines()
        master = [f"127.0.0.1:{self.port}      inet  n       -       y       -       -       smtpd"
                  if line.startswith("smtp ") and " inet " in line else line for line in master]
        (self.conf / "master.cf").write_text("\n".join(master) + "\n")
        if relay_to:
            host, port = relay_to
            delivery = [f"relayhost = [{host}]:{port}", "smtp_connection_cache_on_demand = yes"]
        else:  # the virtual domain's Maildirs, and nothing else
            user = pwd.getpwnam(MAILDIR_USER)
            self.mail.mkdir(parents=True, exist_ok=True)
            shutil.chown(self.mail, user.pw_uid, user.pw_gid)
            domains = sorted({a.split("@", 1)[1] for a in maildirs})
            # texthash: read as it is, no postmap; the trailing slash makes each a Maildir
            (self.conf / "vmailbox").write_text("".join(f"{a} {a}/\n" for a in maildirs))
            delivery = [
                f"virtual_mailbox_domains = {', '.join(domains)}",
                f"virtual_mailbox_base = {self.mail}",
                f"virtual_mailbox_maps = texthash:{self.conf}/vmailbox",
                f"virtual_uid_maps = static:{user.pw_uid}",
                f"virtual_gid_maps = static:{user.pw_gid}",
                "virtual_minimum_uid = 1",
                "relayhost =",
                "default_transport = error:no relay in this benchmark",
            ]
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
            "smtpd_peername_lookup = no",  # no reverse lookup of the load's 127.0.0.x: no DNS outside the bench
            "smtpd_relay_restrictions = permit_mynetworks, reject",
            *delivery,
            "default_destination_concurrency_limit = 20",
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
