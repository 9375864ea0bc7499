"""`mailyard site up --redis-replicas N` (issue 15, item 3): the site's Redis is a primary, N
replicas and three Sentinels on loopback, supervised like every other process and listed with
their roles in `site status --json`; every Mailyard process has the Sentinel URL and follows a
failover without a restart. The machine of the primary lost (its process SIGKILLed and its
data directory deleted): a replica is promoted, acknowledged mail still arrives, mail flows
again, and the old node comes back as a replica. Real `site up`, redis-server and Sentinel
processes throughout."""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailyard import redisconn
from mailyard.site import redis_group
from mailyard.site.redis_group import Layout
from mailyard.site.runner import Site, SiteConfig
from mailyard.testing.waiting import PROCESS_POLL, wait_until
from tests.conftest import ROOT, make_org
from tests.site_run import RunningSite, secrets

# Only what the scenario needs: one hub per site, no Flower, no demo Internet, no Edge.
SMALL = ("--hubs", "1", "--free-ports", "--no-flower", "--no-internet", "--no-edge")


def short_leases(tmp_path: Path) -> str:
    """The demo organization with 10 s leases (not 2 min): the mail a hub was working on when the
    primary went away returns to its queue within the test's patience."""
    text = (ROOT / "deploy" / "contoso.toml").read_text()
    assert 'lease_time = "2m"' in text
    path = tmp_path / "contoso.toml"
    path.write_text(text.replace('lease_time = "2m"', 'lease_time = "10s"'))
    return str(path)


def group_of(status: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    nodes = [p for p in status["processes"] if p["role"] == "redis"]
    return nodes, [p for p in status["processes"] if p["role"] == "sentinel"]


def roles(status: dict[str, Any]) -> dict[str, str | None]:
    return {p["name"]: p.get("replication") for p in group_of(status)[0]}


def settled(site: RunningSite, replicas: int) -> dict[str, Any] | None:
    """The status once the site is ready with one primary and ``replicas`` replicas, else None."""
    status = site.status()
    nodes, sentinels = group_of(status)
    found = sorted(p.get("replication") or "" for p in nodes)
    if status["ready"] and found == ["primary"] + ["replica"] * replicas and len(sentinels) == 3 \
            and all(p["ready"] and p["up"] for p in nodes + sentinels):
        return status
    return None


def pids(status: dict[str, Any], *kinds: str) -> dict[str, int]:
    return {p["name"]: p["pid"] for p in status["processes"] if p["role"] in kinds}


def inbox(site: RunningSite, address: str) -> list[str]:
    return [m["subject"] for m in json.loads(site.mailyard("mailbox", "show", address, "--json").stdout)]


def smtp_in(address: str, subjects: list[str], to: str) -> None:
    """Mail from outside (127.0.0.9: the Internet receive connector), each one acknowledged with 250."""
    host, _, port = address.rpartition(":")
    with smtplib.SMTP(host, int(port), local_hostname="mail.internet.example", timeout=60,
                      source_address=("127.0.0.9", 0)) as client:
        for subject in subjects:
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = "grace@fabrikam.example", to, subject
            msg.set_content("hello")
            assert client.send_message(msg) == {}


def test_redis_replicas_and_redis_url_together_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "mailyard", "site", "up", "--data-dir", str(tmp_path / "var"),
                             "--redis-replicas", "1", "--redis-url", "redis://127.0.0.1:1/0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert "--redis-replicas" in result.stderr and "--redis-url" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "var" / "site.json").exists()
    # ...and by the runner itself
    site = Site(SiteConfig(org=make_org(), config_path=tmp_path / "org.toml", data_dir=tmp_path / "var",
                           redis_url="redis://127.0.0.1:1/0", redis_replicas=1, internet=False))
    site.load_secrets()
    with pytest.raises(Exception, match="--redis-replicas"):
        site.plan()


def test_the_plan_hands_every_child_the_sentinel_url_and_keeps_the_groups_ports(tmp_path: Path) -> None:
    data = tmp_path / "var"
    site = Site(SiteConfig(org=make_org(), config_path=tmp_path / "org.toml", data_dir=data, redis_replicas=2,
                           internet=False))
    password = site.load_secrets().redis_password
    assert password
    site.plan()
    assert site.layout is not None and len(site.layout.node_ports) == 3 and len(site.layout.sentinel_ports) == 3
    url = site.env()[redisconn.ENV_URL]
    assert redisconn.is_sentinel(url) and url == site.layout.url(password)
    assert [(c.name, c.role) for c in site.all_children()[:6]] == [
        ("redis-0", "redis"), ("redis-1", "redis"), ("redis-2", "redis"),
        ("sentinel-0", "sentinel"), ("sentinel-1", "sentinel"), ("sentinel-2", "sentinel")]
    # Each member its own directory; the group's ports all different
    ports = site.layout.node_ports + site.layout.sentinel_ports
    assert len(set(ports)) == 6
    site.write_state()
    state_text = (data / "site.json").read_text()
    assert password not in state_text
    state = json.loads(state_text)
    assert state["redis_url"] == redisconn.without_password(url) and redisconn.is_sentinel(state["redis_url"])
    assert state["redis_group"]["nodes"] == site.layout.node_ports
    site.ports.close()
    # The next start from this data directory: the same ports (the Sentinels know the nodes there)
    again = Site(SiteConfig(org=make_org(), config_path=tmp_path / "org.toml", data_dir=data, redis_replicas=2,
                            internet=False))
    again.load_secrets()
    again.plan()
    assert again.layout is not None
    assert again.layout.node_ports == site.layout.node_ports
    assert again.layout.sentinel_ports == site.layout.sentinel_ports
    assert again.env()[redisconn.ENV_URL] == url
    again.ports.close()


@pytest.mark.slow
def test_the_primarys_machine_lost_a_replica_takes_over_no_acknowledged_mail_is_lost_it_rejoins(
        tmp_path: Path) -> None:
    # Two replicas: with min-replicas-to-write 1, the promoted one still has a replica and takes
    # writes while the old primary is away.
    data = tmp_path / "var"
    site = RunningSite(data, *SMALL, "--redis-replicas", "2", "--config", short_leases(tmp_path))
    try:
        state = site.wait_up()
        assert redisconn.is_sentinel(state["redis_url"]) and not redisconn.has_password(state["redis_url"])
        status = wait_until(lambda: settled(site, 2), timeout=60, interval=0.2,
                            message=lambda: json.dumps(site.status()["processes"][:6], indent=1))
        nodes, sentinels = group_of(status)
        assert [p["name"] for p in nodes] == ["redis-0", "redis-1", "redis-2"]
        assert [p["name"] for p in sentinels] == ["sentinel-0", "sentinel-1", "sentinel-2"]
        (old,) = [p for p in nodes if p["replication"] == "primary"]
        assert {p["primary"] for p in sentinels} == {old["name"]}
        # Each member in its own data directory under the site's; the hubs have the Sentinel URL
        group = state["redis_group"]
        assert sorted(os.listdir(data / "redis")) == ["node-0", "node-1", "node-2",
                                                      "sentinel-0", "sentinel-1", "sentinel-2"]
        hub = next(p for p in state["processes"] if p["role"] == "hub" and p["site"] == "Amsterdam")
        environ = Path(f"/proc/{hub['pid']}/environ").read_bytes().split(b"\0")
        url = next(e for e in environ if e.startswith(b"MAILYARD_REDIS_URL=")).split(b"=", 1)[1].decode()
        layout = Layout(Path(group["root"]), group["nodes"], group["sentinels"])
        assert url == layout.url(secrets(data)["redis"]["password"])
        followers = pids(status, "hub", "mailbox", "viewer")

        site.mailyard("send", "--from", "alice@contoso.com", "--to", "erin@contoso.com", "--subject", "before",
                      "--body", "hi")
        wait_until(lambda: "before" in inbox(site, "erin@contoso.com"), timeout=60, interval=PROCESS_POLL,
                   message=lambda: site.output[-3000:])
        # A burst from outside, each acknowledged (250), the last of them right before the loss
        burst = [f"burst {n}" for n in range(10)]
        smtp_in(hub["smtp"]["Internet"], burst, "frank@contoso.com")

        # The primary's machine is lost: its process killed, its data gone
        os.kill(old["pid"], signal.SIGKILL)
        shutil.rmtree(data / "redis" / f"node-{old['name'].rpartition('-')[2]}")

        # A replica is promoted; the old node is started again, and waits (it has no data and
        # the Sentinels still named it primary), then rejoins as a replica of the new one
        def promoted() -> str | None:
            now = [name for name, role in roles(site.status()).items() if role == "primary"]
            return now[0] if now and now[0] != old["name"] else None
        new = wait_until(promoted, timeout=60, interval=0.2, message=lambda: str(site.status()["processes"][:6]))
        site.mailyard("send", "--from", "alice@contoso.com", "--to", "erin@contoso.com", "--subject", "after",
                      "--body", "hi")
        smtp_in(hub["smtp"]["Internet"], ["after from outside"], "frank@contoso.com")
        status = wait_until(lambda: settled(site, 2), timeout=90, interval=0.2,
                            message=lambda: json.dumps(site.status()["processes"][:6], indent=1))
        back = next(p for p in group_of(status)[0] if p["name"] == old["name"])
        assert back["replication"] == "replica" and back["restarts"] >= 1 and back["pid"] != old["pid"]
        assert roles(status)[new] == "primary"
        assert {p["primary"] for p in group_of(status)[1]} == {new}
        log = (data / "logs" / f"{old['name']}.log").read_text(errors="replace")
        assert "MASTER <-> REPLICA sync: Finished with success" in log

        # Every acknowledged message arrives, once; and mail sent after the failover too
        def delivered() -> bool:
            return sorted(inbox(site, "frank@contoso.com")) == sorted([*burst, "after from outside"]) and \
                sorted(inbox(site, "erin@contoso.com")) == ["after", "before"]
        wait_until(delivered, timeout=90, interval=0.5,
                   message=lambda: f"frank: {inbox(site, 'frank@contoso.com')}, erin: {inbox(site, 'erin@contoso.com')}")
        # The hubs, mailbox servers and viewer followed the failover: none was restarted
        status = site.status()
        assert pids(status, "hub", "mailbox", "viewer") == followers
        assert all(p["restarts"] == 0 for p in status["processes"] if p["role"] in ("hub", "mailbox", "viewer"))
        # The person's view says which is which
        shown = site.mailyard("site", "status").stdout
        assert f"redis (primary)  {new}" in shown and f"redis (replica)  {old['name']}" in shown, shown
        assert f"Replicated Redis: primary {new}" in shown, shown
    finally:
        site.stop()


@pytest.mark.slow
def test_site_down_stops_every_member_and_the_next_start_reuses_their_data_and_ports(tmp_path: Path) -> None:
    data = tmp_path / "var"
    site = RunningSite(data, *SMALL, "--redis-replicas", "1")
    try:
        state = site.wait_up()
        status = wait_until(lambda: settled(site, 1), timeout=60, interval=0.2,
                            message=lambda: json.dumps(site.status()["processes"][:5], indent=1))
        assert len(group_of(status)[0]) == 2 and len(group_of(status)[1]) == 3
        site.mailyard("send", "--from", "alice@contoso.com", "--to", "erin@contoso.com", "--subject", "kept",
                      "--body", "hi")
        wait_until(lambda: "kept" in inbox(site, "erin@contoso.com"), timeout=60, interval=PROCESS_POLL,
                   message=lambda: site.output[-3000:])
        members = pids(status, "redis", "sentinel")
        down = site.mailyard("site", "down")
        assert "stopped." in down.stdout
        site.proc.wait(timeout=60)
        assert not [name for name, pid in members.items() if Path(f"/proc/{pid}").exists()], members
    finally:
        site.stop()
    again = RunningSite(data, *SMALL, "--redis-replicas", "1")
    try:
        restarted = again.wait_up()
        assert restarted["redis_group"] == state["redis_group"]
        assert restarted["redis_url"] == state["redis_url"]
        wait_until(lambda: settled(again, 1), timeout=60, interval=0.2,
                   message=lambda: json.dumps(again.status()["processes"][:5], indent=1))
        assert inbox(again, "erin@contoso.com") == ["kept"]
        again.mailyard("send", "--from", "alice@contoso.com", "--to", "erin@contoso.com", "--subject", "again",
                       "--body", "hi")
        wait_until(lambda: sorted(inbox(again, "erin@contoso.com")) == ["again", "kept"], timeout=60, interval=PROCESS_POLL,
                   message=lambda: again.output[-3000:])
    finally:
        again.stop()


def test_a_site_that_ran_with_one_redis_keeps_its_data_when_it_gets_replicas(tmp_path: Path) -> None:
    from mailyard.site import replicas

    root = tmp_path / "redis"
    (root / "appendonlydir").mkdir(parents=True)
    (root / "appendonlydir" / "appendonly.aof.1.base.rdb").write_bytes(b"REDIS0010...")
    assert replicas.adopt_single_redis(root)
    assert redis_group.has_data(Layout(root, [1], [2]), 0) and not (root / "appendonlydir").exists()
    assert not replicas.adopt_single_redis(root)  # (once)
    # ...and going back to one Redis would start it empty beside the group's data: refused
    with pytest.raises(Exception, match="--redis-replicas"):
        replicas.refuse_single_over_group(root)
