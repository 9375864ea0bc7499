"""The ``mailyard`` command as a user runs it: org, send, mailbox show, queue, track, site."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
import redis

from mailyard import keys, redisconn, tracking
from mailyard.testing.waiting import PROCESS_POLL, wait_until
from mailyard.txn import Txn
from tests.conftest import CONTOSO, ROOT


def mailyard(*args: str, env: dict[str, str] | None = None, check: bool = True,
             cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "mailyard", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, cwd=cwd, timeout=120)
    if check:
        assert result.returncode == 0, f"mailyard {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_org_check_reports_a_bad_file_with_line_and_key(tmp_path) -> None:
    bad = tmp_path / "org.toml"
    bad.write_text(CONTOSO.read_text().replace('server = "MBX-LON-01"', 'server = "MBX-PAR-01"', 1))
    result = mailyard("org", "check", str(bad), check=False)
    assert result.returncode == 1
    assert "mailboxes[4].server: no mailbox server named 'MBX-PAR-01'" in result.stderr
    assert "line " in result.stderr
    assert "valid" in mailyard("org", "check", str(CONTOSO)).stdout


def test_without_a_site_commands_say_how_to_start_one(tmp_path) -> None:
    result = mailyard("queue", "list", "--data-dir", str(tmp_path), check=False,
                      env={"MAILYARD_REDIS_URL": ""})
    assert result.returncode == 1 and "mailyard site up" in result.stderr


def test_org_apply_and_show_json(redis_url) -> None:
    env = {"MAILYARD_REDIS_URL": redis_url}
    assert "applied" in mailyard("org", "apply", str(CONTOSO), env=env).stdout
    data = json.loads(mailyard("org", "show", "--json", env=env).stdout)
    assert data["accepted_domains"] == ["contoso.com"]
    assert [s["name"] for s in data["sites"]] == ["Amsterdam", "London"]
    assert data["sites"][0]["mailbox_servers"] == ["MBX-AMS-01", "MBX-AMS-02"]
    alice = next(m for m in data["mailboxes"] if m["address"] == "alice@contoso.com")
    assert alice["aliases"] == ["a.anders@contoso.com"] and alice["server"] == "MBX-AMS-01"
    assert alice["password"] == "********" and "server_token" not in data["transport"]
    assert {"address", "members"} <= set(data["groups"][0])
    assert data["contacts"][0]["external_address"] == "grace@fabrikam.example"
    assert "Amsterdam" in mailyard("org", "show", env=env).stdout


def test_send_show_queue_and_track_from_the_command_line(cluster_factory) -> None:
    site = cluster_factory()
    site.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
    site.start_hub("Amsterdam", "cli-hub")
    # (the cluster's operator, named the way a user outside the site's directory names a logon)
    env = {"MAILYARD_REDIS_URL": site.redis_url, "MAILYARD_USER": site.operator[0],
           "MAILYARD_PASSWORD": site.operator[1], "MAILYARD_CA_FILE": str(site.pki.cert_path)}

    sent = json.loads(mailyard("send", "--from", "alice@contoso.com", "--to", "carol@contoso.com",
                               "--cc", "erin@contoso.com", "--subject", "from the CLI", "--body", "Hello!",
                               "--json", env=env).stdout)
    assert sent["recipients"] == ["carol@contoso.com", "erin@contoso.com"]

    def inbox() -> list[dict]:
        items = json.loads(mailyard("mailbox", "show", "carol@contoso.com", "--json", env=env).stdout)
        return [i for i in items if i["subject"] == "from the CLI"]

    (item,) = wait_until(inbox, timeout=30, interval=PROCESS_POLL)
    assert {"id", "message_id", "from", "to", "subject", "date"} <= set(item)
    assert item["message_id"] == sent["message_id"] and item["from"] == "alice@contoso.com"
    raw = mailyard("mailbox", "show", "carol@contoso.com", "--raw", item["id"], env=env).stdout
    assert "Subject: from the CLI" in raw and "Hello!" in raw
    sent_items = json.loads(mailyard("mailbox", "show", "alice@contoso.com", "--folder", "Sent Items",
                                     "--json", env=env).stdout)
    assert [i["subject"] for i in sent_items] == ["from the CLI"]

    # Erin is in London: her copy waits, visible, in the relay queue to London
    queues = json.loads(mailyard("queue", "list", "--json", env=env).stdout)
    relay = next(q for q in queues if q["identity"] == "Amsterdam\\London")
    assert relay["delivery_type"] == "SmtpRelayToRemoteAdSite" and relay["message_count"] == 1
    waiting = json.loads(mailyard("queue", "messages", "Amsterdam\\London", "--json", env=env).stdout)
    assert waiting[0]["recipients"][0]["address"] == "erin@contoso.com"
    assert "Amsterdam\\Submission" in mailyard("queue", "list", env=env).stdout

    path = json.loads(mailyard("track", "--message-id", sent["message_id"], "--json", env=env).stdout)
    events = [r["event"] for r in path]
    assert events[:2] == ["SUBMIT", "RECEIVE"] or events[0] == "RECEIVE", events
    assert {"RECEIVE", "TRANSFER", "DELIVER"} <= set(events), events

    bad = mailyard("mailbox", "show", "nobody@contoso.com", env=env, check=False)
    assert bad.returncode == 1 and "not a mailbox of this organization" in bad.stderr


def test_a_send_whose_answer_is_lost_is_asked_again_and_is_one_message(cluster_factory) -> None:
    site = cluster_factory()
    # The mailbox server dies once the message is in the Outbox, before it answers (no hub runs:
    # the Outbox keeps what it gets); restarted, as site up does
    site.start_mailbox("MBX-AMS-01", faults="mailbox.outbox.stored=child")
    site.supervise()
    env = {"MAILYARD_REDIS_URL": site.redis_url, "MAILYARD_USER": site.operator[0],
           "MAILYARD_PASSWORD": site.operator[1], "MAILYARD_CA_FILE": str(site.pki.cert_path)}
    sent = json.loads(mailyard("send", "--from", "alice@contoso.com", "--to", "bob@contoso.com", "--subject",
                               "answer lost", "--body", "once", "--json", env=env).stdout)
    assert site.r.exists(keys.fault("mailbox.outbox.stored")), "the first answer was lost"
    assert sent["duplicate"], "the answer is the resent request's: the message was there already"
    outbox = [i for i in site.folder("alice@contoso.com", "Outbox") if i["subject"] == "answer lost"]
    assert [(i["id"], i["message_id"]) for i in outbox] == [(sent["id"], sent["message_id"])]
    # the same Message-ID, given again by the user, is no new mail either
    again = json.loads(mailyard("send", "--from", "alice@contoso.com", "--to", "bob@contoso.com", "--subject",
                                "answer lost", "--body", "once", "--message-id", sent["message_id"], "--json",
                                env=env).stdout)
    assert again["duplicate"] and again["id"] == sent["id"]
    usage = mailyard("send", "--from", "alice@contoso.com", "--subject", "x", env=env, check=False)
    assert usage.returncode == 2 and "exactly one of --body and --file" in usage.stderr


def test_track_times_before_1970_or_not_times_are_usage_errors(redis_url) -> None:
    txn = Txn()
    tracking.add(txn, tracking.Record(tracking.Event.RECEIVE, internal_id="m1"), 86_400.0)
    assert txn.run(redis.Redis.from_url(redis_url)).ok
    env = {"MAILYARD_REDIS_URL": redis_url}
    for option, value, needle in (("--start", "1960-01-01", "before 1970"),
                                  ("--end", "1969-12-31T23:59:59", "before 1970"),
                                  ("--start", "1970-01-01T00:00:00+05:00", "before 1970"),
                                  ("--start", "0001-01-01", "before 1970"),
                                  ("--start", "garbage", "not a time"), ("--end", "2026-13-01", "not a time"),
                                  ("--limit", "0", "0 is not in the range")):
        result = mailyard("track", option, value, env=env, check=False)
        assert result.returncode == 2, (option, value, result.stderr)
        assert f"Invalid value for '{option}'" in result.stderr and needle in result.stderr, result.stderr
        assert "Redis" not in result.stderr and "Traceback" not in result.stderr, result.stderr

    def found(*args: str) -> list[str]:
        return [r["internal_id"] for r in json.loads(mailyard("track", *args, "--json", env=env).stdout)]

    assert found("--start", "1970-01-01") == ["m1"]
    assert found("--start", "9999-12-31T23:59:59.999-23:59") == []
    assert found("--end", "1970-01-01T00:00:00Z") == [], "the end is exclusive, even at 1970"
    assert found("--end", "9999-12-31") == ["m1"]


def start_site(data: Path, *args: str) -> subprocess.Popen:
    # A person's shell may hold settings of its own: the site uses its secrets.toml all the same.
    env = {**os.environ, "MAILYARD_VIEWER_TOKEN": "contoso-demo-viewer-token", "FLOWER_UNAUTHENTICATED_API": "true"}
    # Free ports: the fixed defaults (2525, 8080...) may be another site's, or the compose walkthrough's.
    return subprocess.Popen([sys.executable, "-m", "mailyard", "site", "up", "--data-dir", str(data), "--free-ports",
                             *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)


def site_ready(data: Path) -> dict | None:
    result = mailyard("site", "status", "--data-dir", str(data), "--json", check=False)
    if result.returncode != 0:
        return None
    state = json.loads(result.stdout)
    ready = state["running"] and state["ready"] and all(p["up"] for p in state["processes"])
    return state if ready else None


def dkim_verifies(raw: bytes, dns_address: str) -> bool:
    """Whether ``raw``'s DKIM signature verifies against the key the demo Internet publishes."""
    import dkim

    from mailyard.internet.dns import make_resolver

    host, _, port = dns_address.rpartition(":")
    resolver = make_resolver(host, int(port))

    def txt(name: bytes, timeout: int = 5) -> bytes:
        return b"".join(b"".join(rr.strings) for rr in resolver.resolve(name.decode().rstrip("."), "TXT"))
    return bool(b"DKIM-Signature:" in raw and dkim.verify(raw, dnsfunc=txt))


def stop_site(runner: subprocess.Popen) -> str:
    runner.send_signal(signal.SIGTERM)
    out, _ = runner.communicate(timeout=60)
    assert runner.returncode == 0, out
    return out


def check_operator_surfaces(state: dict, secrets: dict) -> None:
    """Flower and the Queue Viewer of a running site answer only with the site's secrets."""
    user, password, token = secrets["flower"]["user"], secrets["flower"]["password"], secrets["viewer"]["token"]
    flower = next(p for p in state["processes"] if p["role"] == "flower")
    viewer = next(p for p in state["processes"] if p["role"] == "viewer")
    for process, secret in ((flower, password), (viewer, token)):
        assert "secrets.toml" in process["logon"] and secret not in json.dumps(state)
        cmdline = Path(f"/proc/{process['pid']}/cmdline").read_bytes().decode(errors="replace")
        assert secret not in cmdline, f"{process['name']}: a secret on the command line is in everyone's `ps`"

    base = flower["url"]
    for path in ("/", "/workers", "/tasks", "/api/workers", "/api/tasks", "/metrics"):
        assert httpx.get(base + path, timeout=10).status_code == 401, path
        assert httpx.get(base + path, auth=(user, "wrong"), timeout=10).status_code == 401, path
        assert httpx.get(base + path, auth=(user, password), timeout=10).status_code == 200, path
    # a POST of the API (shutting a hub down, as a cross-site form once did) without the logon
    assert httpx.post(base + "/api/worker/shutdown/hub@amsterdam-hub-1", timeout=10).status_code == 401
    assert httpx.get(base + "/healthcheck", timeout=10).status_code == 200  # "OK", for health checks

    url = viewer["url"].rstrip("/")
    for path, params in (("/api/track", {"sender": "bob@contoso.com"}), ("/api/queues", {}),
                         ("/api/messages/export", {"identity": "1"}), ("/metrics", {})):
        assert httpx.get(url + path, params=params, timeout=10).status_code == 401, path
        placeholder = {"Authorization": "Bearer contoso-demo-viewer-token"}
        assert httpx.get(url + path, params=params, headers=placeholder, timeout=10).status_code == 403, path
    right = {"Authorization": f"Bearer {token}"}
    assert httpx.get(url + "/api/track", params={"sender": "bob@contoso.com"}, headers=right, timeout=10
                     ).status_code == 200
    scraper = {"Authorization": f"Bearer {secrets['viewer']['metrics_token']}"}
    assert httpx.get(url + "/metrics", headers=scraper, timeout=10).status_code == 200
    assert httpx.get(url + "/api/queues", headers=scraper, timeout=10).status_code == 403
    assert httpx.get(url + "/health", timeout=10).json()["token_required"] is True


@pytest.mark.slow
def test_site_up_runs_the_demo_supervises_it_and_stops_everything(tmp_path) -> None:
    data = tmp_path / "var"
    runner = start_site(data, "--hubs", "1")
    try:
        def status() -> dict | None:
            return site_ready(data)

        state = wait_until(status, timeout=60, interval=PROCESS_POLL, message="the site did not come up")
        # Every secret the site generated is in one file, only its owner's, named by the state
        secrets_file = Path(state["secrets_file"])
        assert secrets_file == (data / "secrets.toml").resolve()
        assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
        secrets = tomllib.loads(secrets_file.read_text())
        assert set(secrets) >= {"flower", "viewer", "redis"} and len(secrets["viewer"]["token"]) >= 40
        # Redis has a password, which is in no process's command line and not in site.json
        redis_password = secrets["redis"]["password"]
        assert len(redis_password) >= 40 and redis_password not in (data / "site.json").read_text()
        for p in state["processes"]:
            assert redis_password not in Path(f"/proc/{p['pid']}/cmdline").read_bytes().decode(errors="replace"), p
        assert stat.S_IMODE((data / "redis").stat().st_mode) == 0o700
        shown = mailyard("site", "status", "--data-dir", str(data)).stdout
        assert str(secrets_file) in shown and "logon: user and password in secrets.toml [flower]" in shown
        assert secrets["flower"]["password"] not in shown and secrets["viewer"]["token"] not in shown
        check_operator_surfaces(state, secrets)
        roles = sorted(p["role"] for p in state["processes"])
        assert roles == ["edge", "edge-redis", "flower", "hub", "hub", "internet", "mailbox", "mailbox", "mailbox", "redis",
                         "viewer"], roles
        # The Edge has its own Redis and never the organization's password, nor its URL
        edge = next(p for p in state["processes"] if p["role"] == "edge")
        environ = Path(f"/proc/{edge['pid']}/environ").read_bytes().decode(errors="replace")
        assert secrets["edge"]["redis_password"] in environ and redis_password not in environ
        assert "MAILYARD_REDIS_URL=" not in environ
        # The hubs keep only the organization's own connectors: the Internet reaches the Edge
        hubs_smtp = [p["smtp"] for p in state["processes"] if p["role"] == "hub"]
        assert all(set(smtp) == {"Default", "Client"} for smtp in hubs_smtp), hubs_smtp
        assert state["redis_url"].startswith("redis://127.0.0.1:")
        for p in state["processes"]:
            if p["role"] == "mailbox":
                assert p["url"].startswith("https://127.0.0.1:")

        # Mail flows, through the commands a user types, found through the state file
        env = {"MAILYARD_DATA_DIR": str(data), "MAILYARD_REDIS_URL": ""}
        mailyard("send", "--from", "bob@contoso.com", "--to", "dave@contoso.com", "--subject", "demo",
                 "--body", "hi", env=env)
        wait_until(lambda: "demo" in mailyard("mailbox", "show", "dave@contoso.com", env=env).stdout,
                   timeout=90, interval=PROCESS_POLL, message="bob's mail did not reach dave")
        # ...out to the demo Internet, from London through Amsterdam's Internet connector...
        mailyard("send", "--from", "erin@contoso.com", "--to", "someone@fabrikam.example", "--subject", "out",
                 "--body", "hi", env=env)

        def arrived_outside() -> list:
            shown = mailyard("internet", "show", "fabrikam.example", "--json", env=env)
            return [m for m in json.loads(shown.stdout) if m["subject"] == "out"]

        # Only the site's operator (who can read its secrets.toml) logs on as its operator.
        # From another directory, the same commands reach nothing: Redis wants its password...
        elsewhere = {"MAILYARD_DATA_DIR": str(tmp_path / "elsewhere"), "MAILYARD_REDIS_URL": state["redis_url"]}
        (tmp_path / "elsewhere" / "pki").mkdir(parents=True)
        shutil.copy(data / "pki" / "ca.crt", tmp_path / "elsewhere" / "pki" / "ca.crt")
        for command in (["mailbox", "show", "dave@contoso.com"], ["queue", "list"], ["track", "--sender", "bob@contoso.com"],
                        ["send", "--from", "bob@contoso.com", "--to", "dave@contoso.com", "--body", "x"]):
            refused = mailyard(*command, env=elsewhere, check=False)
            assert refused.returncode == 1 and "password" in refused.stderr, (command, refused.stderr)
        # ...and one who has Redis's password still logs on to no mailbox without a password of its own
        redis_url = redisconn.with_password(state["redis_url"], secrets["redis"]["password"])
        nearer = {**elsewhere, "MAILYARD_REDIS_URL": redis_url}
        for extra in ({}, {"MAILYARD_USER": "operator", "MAILYARD_PASSWORD": "guess"},
                      {"MAILYARD_USER": "bob@contoso.com", "MAILYARD_PASSWORD": "wrong"}):
            refused = mailyard("mailbox", "show", "dave@contoso.com", env={**nearer, **extra}, check=False)
            assert refused.returncode == 1, refused.stdout
            assert "no local operator" in refused.stderr or "401" in refused.stderr, refused.stderr
        # The demo's well-known mailbox passwords do not work here: site up generated others
        bob = secrets["mailboxes"]["bob@contoso.com"]
        assert bob != "bob-demo-password" and len(bob) >= 40
        known = mailyard("mailbox", "show", "bob@contoso.com", check=False,
                         env={**nearer, "MAILYARD_USER": "bob@contoso.com", "MAILYARD_PASSWORD": "bob-demo-password"})
        assert known.returncode == 1 and "401" in known.stderr, known.stderr
        nosy = mailyard("mailbox", "show", "dave@contoso.com", check=False,
                        env={**nearer, "MAILYARD_USER": "bob@contoso.com", "MAILYARD_PASSWORD": bob})
        assert nosy.returncode == 1 and "403" in nosy.stderr and "may not read dave@contoso.com" in nosy.stderr
        mine = mailyard("mailbox", "show", "bob@contoso.com",
                        env={**nearer, "MAILYARD_USER": "bob@contoso.com", "MAILYARD_PASSWORD": bob})
        assert "bob@contoso.com / Inbox" in mine.stdout

        (outside,) = wait_until(arrived_outside, timeout=60, interval=PROCESS_POLL)
        assert outside["from"] == "erin@contoso.com" and outside["to"] == ["someone@fabrikam.example"]
        # ...through the Edge, which signed it with contoso.com's key, as the demo DNS publishes it
        internet = next(p for p in state["processes"] if p["role"] == "internet")
        raw = Path(outside["file"]).read_bytes()
        assert b"by edge-01.contoso.com (Mailyard)" in raw.split(b"\r\n\r\n")[0], raw[:2000]
        assert dkim_verifies(raw, internet["dns"]), raw[:2000]
        # ...and in from it, anonymously, through the Edge (contoso.com's MX host), only to the
        # organization's own recipients
        sent = mailyard("internet", "send", "--from", "grace@fabrikam.example", "--to", "frank@contoso.com",
                        "--subject", "in", "--body", "hello", env=env)
        assert f"sent to {edge['edge_smtp']}" in sent.stdout, sent.stdout

        def frank_has(subject: str) -> str | None:
            shown = mailyard("mailbox", "show", "frank@contoso.com", env=env).stdout
            found = [line.split()[0] for line in shown.splitlines() if line.rstrip().endswith(f" {subject}")]
            return found[0] if found else None
        inbound = wait_until(lambda: frank_has("in"), timeout=60, interval=PROCESS_POLL)
        raw_in = mailyard("mailbox", "show", "frank@contoso.com", "--raw", inbound, env=env).stdout
        assert "Authentication-Results: edge-01.contoso.com;" in raw_in and "spf=pass" in raw_in, raw_in[:2000]
        relay = mailyard("internet", "send", "--from", "grace@fabrikam.example", "--to",
                         "x@tailspintoys.example", "--subject", "relay?", env=env, check=False)
        assert relay.returncode == 1 and "5.7.1 Unable to relay" in relay.stderr
        # A known spammer of the demo Internet is on its block list: refused at RCPT
        spam = mailyard("internet", "send", "--from", "grace@fabrikam.example", "--to", "frank@contoso.com",
                        "--source", "127.0.0.66", "--subject", "spam", env=env, check=False)
        assert spam.returncode == 1, spam.stdout
        assert "5.7.1 Recipient not authorized, your IP has been found on a block list" in spam.stderr
        # Flower sees every hub
        flower = next(p["url"] for p in state["processes"] if p["role"] == "flower")
        logon = (secrets["flower"]["user"], secrets["flower"]["password"])
        workers = wait_until(lambda: (w := httpx.get(f"{flower}/api/workers?refresh=1", auth=logon, timeout=10).json())
                             and len(w) == 2 and w, timeout=60, message="Flower does not list both hubs")
        assert set(workers) == {"hub@amsterdam-hub-1", "hub@london-hub-1"}

        # A child that dies is restarted
        hub = next(p for p in state["processes"] if p["role"] == "hub")
        os.kill(hub["pid"], signal.SIGKILL)
        wait_until(lambda: (s := status()) and next(p for p in s["processes"] if p["name"] == hub["name"])[
            "pid"] != hub["pid"], timeout=90, interval=PROCESS_POLL, message="the killed hub was not restarted")
        pids = [p["pid"] for p in status()["processes"]]
    finally:
        out = stop_site(runner)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(), \
            f"process {pid} survived the site's stop"
    # No secret in what the site printed or logged
    everything = out + "".join(p.read_text(errors="replace") for p in (data / "logs").glob("*.log"))
    for section in secrets.values():
        for key, value in section.items():
            assert key == "user" or value not in everything, f"a secret ({key}) was printed or logged"
    assert "MAILYARD_VIEWER_TOKEN is set in the environment: ignored" in out

    # Started again from the same directory, the site keeps its secrets
    before = secrets_file.read_bytes()
    runner = start_site(data, "--hubs", "1", "--no-internet")
    try:
        state = wait_until(lambda: site_ready(data), timeout=60, interval=PROCESS_POLL, message="the site did not come up again")
        assert secrets_file.read_bytes() == before and stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
        check_operator_surfaces(state, secrets)
    finally:
        stop_site(runner)
