"""Run real cluster processes (mailbox servers, hubs) for a test, and talk to them.

Every process is started as the user starts it (``python -m mailyard ...``), with its
output in ``<data dir>/logs/<name>.log``; a test may SIGKILL any of them.
"""

from __future__ import annotations

import json
import mailbox as stdlib_mailbox
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from mailyard import keys, pki, redisconn, registry
from mailyard.org import Operator, Organization
from mailyard.orgstore import apply_org
from mailyard.processes import living_children
from mailyard.redisconn import number, text
from mailyard.site.redis_server import free_port
from mailyard.testing.waiting import wait_until


@dataclass
class Proc:
    name: str
    role: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def children(self) -> list[int]:
        """Its living child processes, whichever of its threads started them (a hub's
        receive listener is started again from a watching thread)."""
        return living_children(self.pid)


OPERATOR = "cluster-operator"


class _MailboxServers(httpx.HTTPTransport):
    """Sets the TLS server name of a request to a mailbox server from the port it calls."""

    def __init__(self, ports: dict[str, int], **kw: Any) -> None:
        super().__init__(**kw)
        self._ports = ports

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme == "https" and "sni_hostname" not in request.extensions:
            server = next((s for s, port in self._ports.items() if port == request.url.port), None)
            if server is not None:
                request.extensions = {**request.extensions, **pki.sni(pki.Identity.mailbox(server))}
        return super().handle_request(request)


class Cluster:
    def __init__(
        self, redis_url: str, data_dir: Path, org: Organization, *, cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.data_dir = Path(data_dir)
        self.org = org
        self.cwd = cwd
        self.extra_env = env or {}
        self.procs: dict[str, Proc] = {}
        self._hub_ports: dict[str, dict[str, int]] = {}
        self._specs: dict[str, tuple[str, list[str], str | None, str | None]] = {}
        self._mailbox_ports: dict[str, int] = {}
        self._stay_down: set[str] = set()
        self._closing = False
        self.r: redis.Redis = redisconn.connect(redis_url)
        # The tests' own logon on mailbox servers: an operator who may read and send as any
        # mailbox (as site up's local operator may), with a password made for this cluster.
        self.operator = (OPERATOR, secrets.token_urlsafe(16))
        self.apply(org)
        self.http = self.client(auth=self.operator)

    # region: processes

    def apply(self, org: Organization) -> None:
        if not any(op.name == OPERATOR for op in org.operators):
            op = Operator(name=OPERATOR, password=self.operator[1], rights=["FullAccess", "SendAs"])
            org = org.model_copy(update={"operators": [*org.operators, op]})
        self.org = org
        # The organization's CA and a certificate for each hub site and mailbox server, where
        # the nodes look for them (``<data-dir>/pki``), as ``site up`` makes them.
        self.pki = pki.issue_all(pki.pki_dir(self.data_dir), org.name,
                                 [(s.name, s.mailbox_servers) for s in org.sites])
        apply_org(self.r, org)

    def _env(self, faults: str | None, redis_url: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        # The URL (with Redis's password) in the environment, never on a command line.
        env[redisconn.ENV_URL] = redis_url or self.redis_url
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("MAILYARD_FAULTS", None)
        if faults:
            env["MAILYARD_FAULTS"] = faults
        return env

    def supervise(self) -> None:
        """Restart any process that dies, as ``site up`` and docker compose do (a process
        stopped with ``kill(..., stay_down=True)`` stays down)."""
        import threading

        def loop() -> None:
            while not self._closing:
                for name, proc in list(self.procs.items()):
                    if not proc.alive and name not in self._stay_down and not self._closing:
                        role, args, faults, url = self._specs[name]
                        self._spawn(name, role, args, faults, url)
                time.sleep(0.3)

        threading.Thread(target=loop, name="supervisor", daemon=True).start()

    def _spawn(self, name: str, role: str, args: list[str], faults: str | None,
               redis_url: str | None = None) -> Proc:
        self._specs[name] = (role, args, faults, redis_url)
        self._stay_down.discard(name)
        old = self.procs.get(name)
        if old and old.alive:
            raise RuntimeError(f"{name} is already running")
        log = self.data_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "mailyard", *args, "--data-dir", str(self.data_dir)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self._env(faults, redis_url), cwd=self.cwd, start_new_session=True,
            )
        proc = Proc(name, role, popen, log)
        self.procs[name] = proc
        return proc

    def start_mailbox(self, server: str, *, port: int = 0, wait: bool = True, faults: str | None = None) -> Proc:
        port = port or self._mailbox_ports.get(server) or free_port()
        self._mailbox_ports[server] = port
        proc = self._spawn(server, "mailbox",
                           ["mailbox", "serve", "--server", server, "--port", str(port)], faults)
        url = f"https://127.0.0.1:{port}"
        if wait:
            wait_until(lambda: self._healthy(url, proc), timeout=30,
                       message=lambda: f"mailbox server {server} did not start: {self.tail(server)}")
        return proc

    def client(self, auth: tuple[str, str] | None = None, *, cert: pki.Identity | None = None,
               source: str | None = None) -> httpx.Client:
        """An HTTP client for the mailbox servers: it trusts the organization's CA only and
        names the server it means (TLS server name) by the port it calls; ``auth``: the Basic
        logon (none: anonymous); ``cert``: present that node's certificate (a hub's: mutual TLS);
        ``source``: the loopback address it connects from."""
        ctx = (pki.NodeCert(self.pki.dir, cert).client_context() if cert
               else pki.trust_context(self.pki.cert_path))
        transport = _MailboxServers(self._mailbox_ports, verify=ctx, local_address=source)
        return httpx.Client(timeout=30, transport=transport, auth=auth)

    def _healthy(self, url: str, proc: Proc) -> bool:
        if not proc.alive:
            raise AssertionError(f"{proc.name} exited: {self.tail(proc.name)}")
        return self.http.get(url + "/health").status_code == 200

    def start_mailboxes(self, servers: Iterable[str] | None = None) -> None:
        if servers is None:
            servers = [s for site in self.org.sites for s in site.mailbox_servers]
        names = list(servers)
        started = [self.start_mailbox(s, wait=False) for s in names]
        for proc in started:
            self._wait_registered(proc.name)

    def _wait_registered(self, name: str) -> None:
        # (self.procs: the process may have been started again)
        wait_until(lambda: self._registered_and_healthy(self.procs[name]), timeout=30,
                   message=lambda: f"{name} did not start: {self.tail(name)}")

    def _registered_and_healthy(self, proc: Proc) -> bool:
        if not proc.alive and "Address already in use" in self.tail(proc.name):
            # The free port was taken between choosing it and binding it (another test
            # process, or an outgoing connection's ephemeral port): start again on another.
            self._mailbox_ports.pop(proc.name, None)
            self.start_mailbox(proc.name, wait=False)
            return False
        if not proc.alive:
            raise AssertionError(f"{proc.name} exited: {self.tail(proc.name)}")
        url = text(self.r.hget(keys.server(proc.name), "url"))
        if not url or number(self.r.hget(keys.server(proc.name), "pid")) != proc.pid:
            return False
        return self.http.get(url + "/health").status_code == 200

    def start_hub(self, site: str, name: str, *, concurrency: int = 2, faults: str | None = None,
                  wait: bool = True, receive: bool = True, redis_url: str | None = None) -> Proc:
        """A hub; its receive connectors listen on free loopback ports (see ``smtp``)."""
        args = ["hub", "--site", site, "--name", name, "--concurrency", str(concurrency)]
        if receive:
            bindings = sorted({b for c in self.org.receive_connectors for b in c.bindings})
            ports = self._hub_ports.setdefault(name, {b: free_port() for b in bindings})
            # An IPv6 binding ("[::]:25") listens on ::1, every other on 127.0.0.1
            args += [arg for b, port in ports.items()
                     for arg in ("--bind", f"{b}={'[::1]' if b.startswith('[') else '127.0.0.1'}:{port}")]
        else:
            args.append("--no-receive")
        proc = self._spawn(name, "hub", args, faults, redis_url)
        if wait:
            self.wait_hub(proc)
        return proc

    def smtp(self, hub: str, connector: str = "Default") -> tuple[str, int]:
        """(host, port) where ``hub``'s receive connector listens, once it does."""
        def published() -> tuple[str, int] | None:
            info = next((h for h in registry.hubs(self.r) if h.name == hub), None)
            address = info.endpoints.get(connector) if info else None
            if not address:
                return None
            host, _, port = address.rpartition(":")
            return host.strip("[]"), int(port)
        return wait_until(published, timeout=30, message=lambda: f"{hub} has no {connector} listener: "
                          f"{self.tail(hub)}")

    def wait_hub(self, proc: Proc) -> None:
        def up() -> bool:
            if not proc.alive:
                raise AssertionError(f"{proc.name} exited: {self.tail(proc.name)}")
            pid = number(self.r.hget(keys.hub(proc.name), "pid"))
            return pid == proc.pid and proc.name in self.live_hubs()
        wait_until(up, timeout=60, message=lambda: f"hub {proc.name} did not start: {self.tail(proc.name)}")

    def live_hubs(self, site: str | None = None) -> list[str]:
        timeout = self.org.transport.hub_heartbeat_timeout
        return sorted(h.name for h in registry.hubs(self.r)
                      if h.alive(timeout) and (site is None or h.site == site))

    def kill(self, name: str, sig: int = signal.SIGKILL, *, group: bool = True, stay_down: bool = True) -> None:
        """Kill a process (and by default its whole process group: a hub's pool too). Under
        ``supervise()``, ``stay_down=False`` lets it be restarted, as after a crash."""
        if stay_down:
            self._stay_down.add(name)
        proc = self.procs[name]
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig in (signal.SIGKILL, signal.SIGTERM):
            try:
                proc.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait()

    def close(self) -> None:
        self._closing = True
        for proc in self.procs.values():
            if proc.alive:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15  # one deadline for all: they stop side by side
        for proc in self.procs.values():
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.popen.wait()
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stray pool children
            except ProcessLookupError:
                pass
        self.http.close()

    def tail(self, name: str, lines: int = 40) -> str:
        proc = self.procs.get(name)
        if proc is None or not proc.log.exists():
            return "(no log)"
        text = proc.log.read_text(errors="replace").splitlines()[-lines:]
        return f"\n--- {name} ---\n" + "\n".join(text)

    def all_logs(self, lines: int = 60) -> str:
        return "\n".join(self.tail(n, lines) for n in self.procs)

    # endregion

    # region: clients

    def server_of(self, address: str) -> str:
        for mb in self.org.mailboxes:
            if mb.address == address.lower() or address.lower() in mb.aliases:
                return mb.server
        raise KeyError(address)

    def api(self, address: str) -> str:
        server = self.server_of(address)
        return f"{registry.server_url(self.r, server)}/mailboxes/{address}"

    def send(self, sender: str, to: Iterable[str] = (), *, cc: Iterable[str] = (),
             bcc: Iterable[str] = (), subject: str = "test", body: str = "hello",
             message_id: str | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {"to": list(to), "cc": list(cc), "bcc": list(bcc), "subject": subject,
                                   "body": body}
        if message_id:
            payload["message_id"] = message_id
        response = self.http.post(self.api(sender) + "/outbox", content=json.dumps(payload),
                                  headers={"Content-Type": "application/json"})
        assert response.status_code == 202, f"send failed: {response.status_code} {response.text}"
        return response.json()

    def send_raw(self, sender: str, raw: bytes) -> httpx.Response:
        return self.http.post(self.api(sender) + "/outbox", content=raw,
                              headers={"Content-Type": "message/rfc822"})

    def folder(self, address: str, folder: str = "Inbox") -> list[dict[str, Any]]:
        response = self.http.get(f"{self.api(address)}/folders/{folder}")
        assert response.status_code == 200, response.text
        return response.json()["items"]

    def raw(self, address: str, item_id: str, folder: str = "Inbox") -> bytes:
        response = self.http.get(f"{self.api(address)}/folders/{folder}/{item_id}")
        assert response.status_code == 200, response.text
        return response.content

    def maildir(self, address: str) -> stdlib_mailbox.Maildir:
        """The mailbox's Inbox on disk, read with the standard library's Maildir."""
        path = self.data_dir / "mailboxes" / self.server_of(address) / address.lower()
        return stdlib_mailbox.Maildir(path, factory=None, create=False)

    def subjects(self, address: str, folder: str = "Inbox") -> list[str]:
        return [i["subject"] for i in self.folder(address, folder)]

    def wait_for_subject(self, address: str, subject: str, *, count: int = 1, folder: str = "Inbox",
                         timeout: float = 60) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]]:
            items = [i for i in self.folder(address, folder) if i["subject"] == subject]
            return items if len(items) >= count else []
        return wait_until(found, timeout=timeout,
                          message=lambda: f"{count} x {subject!r} in {address}/{folder}; have "
                          f"{self.subjects(address, folder)}\n{self.all_logs(20)}")

    # endregion
