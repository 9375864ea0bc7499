"""Operating the queues from the command line: find what is stuck where and why, suspend,
resume, retry, resubmit, remove (with and without NDR) and export, one by one or by filter;
and follow a message's path in the tracking log."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import PROCESS_POLL, wait_until
from tests.conftest import ROOT, make_org


def run(site: Cluster, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "mailyard", *args], capture_output=True, text=True,
                            input=stdin, timeout=120, cwd=ROOT,
                            env={**os.environ, "MAILYARD_REDIS_URL": site.redis_url})
    if check:
        assert result.returncode == 0, f"mailyard {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def as_json(site: Cluster, *args: str):
    return json.loads(run(site, *args, "--json").stdout)


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory):
    cluster = Cluster(redis_server.new_db(), tmp_path_factory.mktemp("admin"), make_org(), cwd=ROOT)
    try:
        cluster.start_mailboxes()
        cluster.start_hub("Amsterdam", "adm-1")
        yield cluster
    finally:
        cluster.close()


def queue(site: Cluster, identity: str) -> dict:
    return next(q for q in as_json(site, "queue", "list") if q["identity"] == identity)


def test_suspend_inspect_remove_export_and_resume_a_queue(site) -> None:
    # A queue suspended by its identity holds new mail, visibly
    assert as_json(site, "queue", "suspend", "Amsterdam\\MBX-AMS-02")["count"] == 1
    site.send("alice@contoso.com", ["carol@contoso.com"], subject="held 1")
    site.send("alice@contoso.com", ["carol@contoso.com", "dave@contoso.com"], subject="held 2")
    site.send("bob@contoso.com", ["carol@contoso.com"], subject="from bob")
    wait_until(lambda: queue(site, "Amsterdam\\MBX-AMS-02")["message_count"] == 3, timeout=30, interval=PROCESS_POLL)
    suspended = as_json(site, "queue", "list", "--filter", "Status -eq Suspended")
    assert [q["identity"] for q in suspended] == ["Amsterdam\\MBX-AMS-02"]
    table = run(site, "queue", "list", "--filter", "Status -eq Suspended").stdout
    assert "Amsterdam\\MBX-AMS-02" in table and "Suspended" in table and "Amsterdam\\Submission" not in table

    msgs = as_json(site, "queue", "messages", "Amsterdam\\MBX-AMS-02", "--sort", "-Size")
    assert len(msgs) == 3 and msgs[0]["size"] >= msgs[-1]["size"]
    held2 = next(m for m in msgs if m["subject"] == "held 2")
    assert sorted(r["address"] for r in held2["recipients"]) == ["carol@contoso.com", "dave@contoso.com"]
    assert {"identity", "from_address", "status", "size", "date_received", "expiration_time",
            "retry_count", "last_error", "recipients"} <= set(held2)

    # Bulk by filter: suspend bob's messages, export one, remove it (asking first)
    from_bob = "FromAddress -eq 'bob@contoso.com'"
    done = as_json(site, "message", "suspend", "--filter", from_bob)
    assert done["count"] == 1 and done["done"][0]["result"] == "Suspended"
    identity = done["done"][0]["identity"]
    exported = run(site, "message", "export", identity).stdout
    assert "Subject: from bob" in exported
    refused = run(site, "message", "remove", "--filter", from_bob, stdin="n\n", check=False)
    assert refused.returncode == 1 and "Remove 1 message(s)?" in refused.stderr
    assert any(m["subject"] == "from bob" for m in as_json(site, "queue", "messages", "Amsterdam\\MBX-AMS-02"))
    removed = as_json(site, "message", "remove", "--filter", from_bob, "--yes")
    assert removed["count"] == 1
    site.wait_for_subject("bob@contoso.com", "Undeliverable: from bob")

    # Remove without NDR, by identity
    held1 = next(m for m in as_json(site, "queue", "messages", "Amsterdam\\MBX-AMS-02") if m["subject"] == "held 1")
    assert as_json(site, "message", "remove", held1["identity"], "--without-ndr")["count"] == 1

    # Resume: the rest is delivered; nothing removed arrives; only bob got an NDR
    assert as_json(site, "queue", "resume", "Amsterdam\\MBX-AMS-02")["count"] == 1
    site.wait_for_subject("carol@contoso.com", "held 2")
    site.wait_for_subject("dave@contoso.com", "held 2")
    assert "held 1" not in site.subjects("carol@contoso.com") and "from bob" not in site.subjects("carol@contoso.com")
    assert not any(s.startswith("Undeliverable") for s in site.subjects("alice@contoso.com"))


def test_bad_filters_point_at_the_bad_part(site) -> None:
    result = run(site, "queue", "list", "--filter", "Status -eq Retyr", check=False)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert "Retyr" in lines[0] and "Retry" in lines[0]
    assert lines[-1].strip() == "^^^^^" and lines[-1].index("^") == lines[-2].index("Retyr")
    sort = run(site, "queue", "list", "--sort", "Colour", check=False)
    assert sort.returncode == 1 and "cannot sort by 'Colour'" in sort.stderr
    missing = run(site, "queue", "messages", "Amsterdam\\Nowhere", check=False)
    assert missing.returncode == 1 and "no queue" in missing.stderr
    both = run(site, "message", "suspend", "42", "--filter", "Size -gt 0", check=False)
    assert both.returncode == 2


def test_submission_messages_cannot_be_suspended_and_unknown_ones_are_reported(site) -> None:
    result = run(site, "message", "suspend", "Amsterdam\\Submission\\999999", check=False)
    assert result.returncode == 1 and "no message" in result.stderr


def test_the_unreachable_queue_is_resubmitted_after_a_fix(site) -> None:
    org = make_org().model_dump(mode="json")
    org["send_connectors"] = []
    from mailyard.org import Organization

    site.apply(Organization.model_validate(org))
    try:
        site.send("alice@contoso.com", ["someone@fabrikam.example"], subject="nowhere to go")
        wait_until(lambda: queue(site, "Amsterdam\\Unreachable")["message_count"] >= 1, timeout=30, interval=PROCESS_POLL)
        plain = run(site, "queue", "retry", "Amsterdam\\Unreachable", check=False)
        assert plain.returncode == 1 and "--resubmit" in plain.stderr
        # still no route: resubmitting puts it back where it was
        assert as_json(site, "queue", "retry", "Amsterdam\\Unreachable", "--resubmit")["count"] == 1
        wait_until(lambda: queue(site, "Amsterdam\\Unreachable")["message_count"] >= 1, timeout=30, interval=PROCESS_POLL)
    finally:
        site.apply(make_org())
    # with the Internet connector back, the sweeper re-routes it on its own
    wait_until(lambda: queue(site, "Amsterdam\\Unreachable")["message_count"] == 0, timeout=30, interval=PROCESS_POLL)
    assert any(q["identity"] == "Amsterdam\\fabrikam.example" for q in as_json(site, "queue", "list"))


def test_the_tracking_log_shows_a_whole_path_expand_defer_deliver(site) -> None:
    site.kill("MBX-AMS-01")
    sent = site.send("carol@contoso.com", ["amsterdam-team@contoso.com"], subject="team news")
    try:
        wait_until(lambda: queue(site, "Amsterdam\\MBX-AMS-01")["status"] == "Retry", timeout=90, interval=PROCESS_POLL)
    finally:
        site.start_mailbox("MBX-AMS-01")
    for who in ("alice", "bob", "carol", "dave"):
        site.wait_for_subject(f"{who}@contoso.com", "team news")
    path = as_json(site, "track", "--message-id", sent["message_id"])
    events = [e["event"] for e in path]
    assert events.index("RECEIVE") < events.index("EXPAND") < events.index("DEFER"), events
    assert events.index("DEFER") < max(i for i, e in enumerate(events) if e == "DELIVER"), events
    defer = next(e for e in path if e["event"] == "DEFER")
    assert defer["queue"] == "Amsterdam\\MBX-AMS-01" and "MBX-AMS-01" in defer["recipient_status"][0]
    expand = next(e for e in path if e["event"] == "EXPAND")
    assert expand["related"] == "amsterdam-team@contoso.com"
    assert sorted(expand["recipients"]) == sorted(f"{w}@contoso.com" for w in ("alice", "bob", "carol", "dave"))
    delivered = sorted(r for e in path if e["event"] == "DELIVER" for r in e["recipients"])
    assert delivered == sorted(f"{w}@contoso.com" for w in ("alice", "bob", "carol", "dave"))
    by_recipient = as_json(site, "track", "--recipient", "dave@contoso.com", "--event", "DELIVER")
    assert any(e["message_id"] == sent["message_id"] for e in by_recipient)


def screen(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                          check=True, timeout=10).stdout


def test_queue_list_watch_redraws_in_place_when_a_queue_changes(site: Cluster, tmp_path) -> None:
    # Given `queue list --watch` on a terminal (tmux, 200 columns), as an operator on a server
    session = f"watch-{os.getpid()}-{tmp_path.name}"
    command = f"{sys.executable} -m mailyard queue list --watch --interval 0.5"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", "-c", str(ROOT),
                    "-e", f"MAILYARD_REDIS_URL={site.redis_url}", command], check=True, timeout=30)
    identity = "Amsterdam\\MBX-AMS-01"

    def row() -> str | None:
        return next((line for line in screen(session).splitlines() if line.startswith(identity + " ")), None)
    try:
        first = wait_until(row, timeout=60, message=lambda: screen(session))
        assert "Suspended" not in first and screen(session).startswith("Every 0.5 s: mailyard queue list")
        # When the queue is suspended from another terminal, the same screen shows it
        run(site, "queue", "suspend", identity)
        wait_until(lambda: "Suspended" in (row() or ""), timeout=60, message=lambda: screen(session))
        assert screen(session).count(identity + " ") == 1, "redrawn in place, not scrolled"
        run(site, "queue", "resume", identity)
        wait_until(lambda: "Suspended" not in (row() or "Suspended"), timeout=60, message=lambda: screen(session))
    finally:
        run(site, "queue", "resume", identity, check=False)
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=30)
