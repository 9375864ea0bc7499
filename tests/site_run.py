"""`mailyard site up` as a person runs it, for the tests of the local site: start it, read what
it prints, check from outside that every endpoint it lists answers, send mail, stop it."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import httpx
import redis

from mailyard import pki, redisconn
from mailyard.testing.waiting import PROCESS_POLL, wait_until
from tests.conftest import ROOT

UP = "The site is up"
START_TIMEOUT_S = 180  # a whole site on a shared machine of two cores


class RunningSite:
    """One `mailyard site up` process and its data directory."""

    def __init__(self, data: Path, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
                 python: str = sys.executable) -> None:
        self.data = data
        self.python = python  # another virtualenv's (a first run's) python
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [python, "-m", "mailyard", "site", "up", "--data-dir", str(data), *args],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_up(self, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
        """Wait for "The site is up"; return site.json as it was then."""
        def up() -> str:
            # (an exception would be taken for "not yet" by wait_until: an exit is an answer)
            if self.proc.poll() is not None:
                return "exited"
            return "up" if any(UP in line for line in self.lines) else ""
        if wait_until(up, timeout=timeout, interval=0.02, message=lambda: self.output[-4000:]) == "exited":
            raise AssertionError(f"site up exited with {self.proc.returncode}:\n{self.output[-4000:]}")
        return json.loads((self.data / "site.json").read_text())

    def env(self) -> dict[str, str]:
        """The environment of a person's commands beside this site (found through its data dir)."""
        return {"MAILYARD_DATA_DIR": str(self.data), "MAILYARD_REDIS_URL": ""}

    def mailyard(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([self.python, "-m", "mailyard", *args], capture_output=True, text=True,
                                env={**os.environ, **self.env()}, cwd=ROOT, timeout=120)
        if check:
            assert result.returncode == 0, f"mailyard {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result

    def status(self) -> dict[str, Any]:
        return json.loads(self.mailyard("site", "status", "--json").stdout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reader.join(timeout=10)


def secrets(data: Path) -> dict[str, dict[str, str]]:
    return tomllib.loads((data / "secrets.toml").read_text())


def unanswered(state: dict[str, Any], data: Path, timeout: float = 5.0) -> list[str]:
    """Every endpoint site.json lists, each tried once as a client would: what did not answer."""
    found: list[str] = []
    keys_ = secrets(data)
    flower_logon = (keys_["flower"]["user"], keys_["flower"]["password"])
    hubs = [p["name"] for p in state["processes"] if p["role"] == "hub"]
    for p in state["processes"]:
        name, role = p["name"], p["role"]
        try:
            if role == "redis":
                url = redisconn.with_password(p["url"], keys_["redis"]["password"])
                redis.Redis.from_url(url, socket_timeout=timeout).ping()
            elif role == "edge-redis":
                url = redisconn.with_password(p["url"], keys_["edge"]["redis_password"])
                redis.Redis.from_url(url, socket_timeout=timeout).ping()
            elif role == "edge":
                host, _, port = p["edge_smtp"].rpartition(":")
                with smtplib.SMTP(host, int(port), timeout=timeout) as client:
                    code, _ = client.ehlo("mail.fabrikam.example")
                if code != 250:
                    found.append(f"{name} {p['edge_smtp']}: EHLO {code}")
                host, _, port = p["edge_sync"].rpartition(":")
                response = httpx.get(f"https://{host}:{port}/", verify=False, timeout=timeout)
                if response.status_code not in (401, 403, 404):
                    found.append(f"{name} EdgeSync: {response.status_code} without a certificate")
            elif role == "mailbox":
                identity = pki.Identity.mailbox(name)
                with httpx.Client(verify=pki.trust_context(data / "pki" / "ca.crt"), timeout=timeout) as client:
                    response = client.get(p["url"] + "/health", extensions=pki.sni(identity))
                if response.status_code != 200:
                    found.append(f"{name}: /health {response.status_code}")
            elif role == "hub":
                for connector, address in p["smtp"].items():
                    host, _, port = address.rpartition(":")
                    with smtplib.SMTP(host, int(port), timeout=timeout) as client:
                        code, _ = client.ehlo("client.example")
                    if code != 250:
                        found.append(f"{name} {connector} {address}: EHLO {code}")
            elif role == "flower":
                online = httpx.get(p["url"] + "/api/workers", params={"status": "1"}, auth=flower_logon,
                                   timeout=timeout).json()
                missing = [h for h in hubs if not online.get(f"hub@{h}")]
                if missing:
                    found.append(f"flower does not list {missing} as online: {online}")
            elif role == "viewer":
                response = httpx.get(p["url"].rstrip("/") + "/health", timeout=timeout)
                if response.status_code != 200:
                    found.append(f"viewer: /health {response.status_code}")
            elif role == "internet":
                host, _, port = p["dns"].rpartition(":")
                answer = dns.query.udp(dns.message.make_query(p["domains"][0], "MX"), host, port=int(port),
                                       timeout=timeout)
                if not answer.answer:
                    found.append(f"internet: no MX for {p['domains'][0]}")
                for address in p["mx"]:
                    host, _, port = address.rpartition(":")
                    with smtplib.SMTP(host, int(port), timeout=timeout) as client:
                        client.noop()
        except (OSError, ValueError, httpx.HTTPError, redis.RedisError, smtplib.SMTPException,
                dns.exception.DNSException) as exc:
            found.append(f"{name} ({role}): {type(exc).__name__}: {exc}")
    return found


def delivers_mail(site: RunningSite, tag: str) -> None:
    """Mail flows in the site: between its sites, out to its demo Internet, and in from it."""
    site.mailyard("send", "--from", "alice@contoso.com", "--to", "erin@contoso.com", "--subject", f"inside {tag}",
                  "--body", "hi")
    site.mailyard("send", "--from", "erin@contoso.com", "--to", "grace@fabrikam.example", "--subject",
                  f"out {tag}", "--body", "hi")
    site.mailyard("internet", "send", "--from", "grace@fabrikam.example", "--to", "frank@contoso.com",
                  "--subject", f"in {tag}", "--body", "hello")
    for mailbox, subject in (("erin@contoso.com", f"inside {tag}"), ("frank@contoso.com", f"in {tag}")):
        wait_until(lambda m=mailbox, s=subject: s in site.mailyard("mailbox", "show", m).stdout, timeout=90, interval=PROCESS_POLL,
                   message=lambda m=mailbox: f"nothing in {m}: {site.mailyard('mailbox', 'show', m).stdout}")

    def arrived_outside() -> list[dict[str, Any]]:
        shown = json.loads(site.mailyard("internet", "show", "fabrikam.example", "--json").stdout)
        return [m for m in shown if m["subject"] == f"out {tag}"]
    wait_until(arrived_outside, timeout=90, interval=PROCESS_POLL, message=f"out {tag} did not reach the demo Internet")
    # The tracking log has each SMTP reply as the peer gave it: the enhanced status once, not
    # "250 2.6.0 2.6.0 ..."
    sends = [r for r in json.loads(site.mailyard("track", "--json").stdout) if r["event"] == "SEND"]
    replies = [reply for r in sends for reply in r["recipient_status"]]
    assert replies and all(reply.startswith("250 2.6.0 ") for reply in replies), replies
    assert not [reply for reply in replies if re.match(r"\d{3} (\d\.\d{1,3}\.\d{1,3}) \1\b", reply)], replies
