"""An operator's suspend or remove on a message that is being delivered, end to end: through
the CLI and the Queue Viewer, against a real next hop (an SMTP sink found through DNS) that
holds the connection. PendingSuspend and PendingRemove hold whatever the delivery's end:
a failed delivery leaves the message Suspended (or removed, with or without NDR), and a
delivery that succeeds anyway is reported as such."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mailyard import tracking
from mailyard.hub.queue_rows import message_rows
from mailyard.internet.dns import MX, A, DnsServer, Zone
from mailyard.internet.sink import Mode, Sink
from mailyard.org import Organization
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT, make_org
from tests.hub.test_viewer import TOKEN, spawn_viewer, viewer_url

pytestmark = pytest.mark.slow  # each test runs a site through a crash or a hanging next hop

DOMAIN = "hold.example"
QUEUE = f"Amsterdam\\{DOMAIN}"


@pytest.fixture(scope="module")
def world(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("pending")
    zone = Zone()
    zone.replace(DOMAIN, MX(10, f"mx.{DOMAIN}"))
    zone.replace(f"mx.{DOMAIN}", A("127.0.0.5"))
    dns = DnsServer(zone)
    dns.start()
    sink = Sink(tmp / "sink", host="127.0.0.5")  # (port 0: its own free port, no race for one)
    sink.start()
    port = sink.port
    data = make_org().model_dump(mode="json")
    data["transport"]["dns_servers"] = [dns.address]
    for conn in data["send_connectors"]:
        conn["port"] = port
    cluster = Cluster(redis_server.new_db(), tmp / "site", Organization.model_validate(data), cwd=ROOT)
    try:
        cluster.start_mailboxes(["MBX-AMS-01"])
        hub = cluster.start_hub("Amsterdam", "pend-1", wait=False)
        viewer = spawn_viewer(cluster, "viewer", "--token", TOKEN)
        cluster.wait_hub(hub)
        yield {"site": cluster, "sink": sink, "viewer": viewer_url(cluster, viewer)}
    finally:
        sink.release()
        cluster.close()
        sink.stop()
        dns.stop()


def mailyard(site: Cluster, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mailyard", *args, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "MAILYARD_REDIS_URL": site.redis_url})


def finished(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}: {out}\n{err}"
    return json.loads(out)


def rows(site: Cluster) -> list[dict[str, Any]]:
    try:
        return message_rows(site.r, queues=[QUEUE])
    except Exception:
        return []  # the queue appears with its first message


def held(world: dict[str, Any], subject: str) -> dict[str, Any]:
    """Send a message to the held next hop and wait until its delivery is in progress."""
    world["sink"].set_mode(Mode.REFUSE)  # (drops the connections the hub keeps for reuse)
    world["sink"].set_mode(Mode.HOLD_GREETING)
    world["site"].send("alice@contoso.com", [f"someone@{DOMAIN}"], subject=subject)
    return wait_until(lambda: next((m for m in rows(world["site"]) if m["subject"] == subject
                                    and m["status"] == "Active"), None), timeout=60,
                      message=lambda: f"{rows(world['site'])}")


def status_of(site: Cluster, subject: str) -> str | None:
    return next((m["status"] for m in rows(site) if m["subject"] == subject), None)


def at_sink(sink: Sink, subject: str) -> int:
    return sum(1 for m in sink.messages(DOMAIN) if m["subject"] == subject)


def act(world: dict[str, Any], surface: str, action: str, identity: str, *, ndr: bool = True,
        wait: float = 60) -> Callable[[], list[str]]:
    """Start an operator's ``action`` on a message through ``surface``: "cli" (`mailyard message
    ...`) or "viewer" (the Queue Viewer's HTTP API), waiting up to ``wait`` seconds for a
    delivery in progress to end. Returns what gives the results, once the action answered."""
    if surface == "cli":
        args = ["message", action, identity, "--wait", str(wait), *([] if ndr else ["--without-ndr"])]
        proc = mailyard(world["site"], *args)
        return lambda: [d["result"] for d in finished(proc)["done"]]
    answer: dict[str, Any] = {}

    def post() -> None:
        body = {"action": action, "identities": [identity], "wait": wait, **({"ndr": ndr} if action == "remove"
                                                                            else {})}
        with httpx.Client(base_url=world["viewer"], timeout=wait + 30) as api:
            response = api.post("/api/messages/actions", headers={"Authorization": f"Bearer {TOKEN}"}, json=body)
            answer["status"], answer["body"] = response.status_code, response.json()

    thread = threading.Thread(target=post, daemon=True)
    thread.start()

    def result() -> list[str]:
        thread.join(timeout=wait + 30)
        assert answer.get("status") == 200, answer
        return [d["result"] for d in answer["body"]["done"]]
    return result


def tracked(site: Cluster, message: dict[str, Any]) -> list[tuple[str, str]]:
    """The message's tracking records: (event, source)."""
    return [(r.event, r.source) for r in tracking.search(site.r, internal_id=message["internal_message_id"])]


def drop_held_connections(sink: Sink) -> None:
    """The next hop goes away: every held connection drops (the delivery fails), then it is back."""
    sink.set_mode(Mode.REFUSE)
    sink.release()
    sink.set_mode(Mode.ACCEPT)


def test_suspend_through_the_cli_during_a_delivery_that_fails_leaves_it_suspended_until_resumed(world) -> None:
    site, sink = world["site"], world["sink"]
    subject = f"suspend-fails {uuid.uuid4().hex[:6]}"
    message = held(world, subject)
    result = finished(mailyard(site, "message", "suspend", message["identity"]))
    assert [d["result"] for d in result["done"]] == ["PendingSuspend"]
    assert status_of(site, subject) == "PendingSuspend"

    drop_held_connections(sink)
    wait_until(lambda: status_of(site, subject) == "Suspended", timeout=60,
               message=lambda: f"{rows(site)}")
    # The next hop is back and the queue is retried: other mail flows, the suspended one stays.
    finished(mailyard(site, "queue", "retry", QUEUE))
    other = f"flows {uuid.uuid4().hex[:6]}"
    site.send("alice@contoso.com", [f"someone@{DOMAIN}"], subject=other)
    wait_until(lambda: at_sink(sink, other) == 1, timeout=60, message=lambda: f"{rows(site)}")
    assert at_sink(sink, subject) == 0 and status_of(site, subject) == "Suspended"

    resumed = finished(mailyard(site, "message", "resume", message["identity"]))
    assert [d["result"] for d in resumed["done"]] == ["Ready"]
    wait_until(lambda: at_sink(sink, subject) == 1 and status_of(site, subject) is None, timeout=60,
               message=lambda: f"{rows(site)}")
    assert at_sink(sink, subject) == 1


def test_suspend_through_the_viewer_during_a_delivery_that_fails_leaves_it_suspended(world) -> None:
    site, sink = world["site"], world["sink"]
    subject = f"suspend-viewer {uuid.uuid4().hex[:6]}"
    message = held(world, subject)
    result = act(world, "viewer", "suspend", message["identity"])
    wait_until(lambda: status_of(site, subject) == "PendingSuspend", timeout=60, message=lambda: f"{rows(site)}")
    drop_held_connections(sink)
    assert result() == ["Suspended"]
    assert status_of(site, subject) == "Suspended" and at_sink(sink, subject) == 0
    # no longer in flight, it is removed at once (through the CLI, out of the way of the next tests)
    assert act(world, "cli", "remove", message["identity"], ndr=False)() == ["Removed without NDR"]
    assert status_of(site, subject) is None and at_sink(sink, subject) == 0


@pytest.mark.parametrize("surface", ["cli", "viewer"])
@pytest.mark.parametrize("action", ["suspend", "remove"])
def test_an_action_during_a_delivery_that_succeeds_says_it_came_too_late(world, action: str, surface: str) -> None:
    site, sink = world["site"], world["sink"]
    subject = f"too-late-{action}-{surface} {uuid.uuid4().hex[:6]}"
    message = held(world, subject)
    result = act(world, surface, action, message["identity"])
    pending = "PendingSuspend" if action == "suspend" else "PendingRemove"
    wait_until(lambda: status_of(site, subject) == pending, timeout=60, message=lambda: f"{rows(site)}")
    sink.release()
    assert result() == [f"delivered: the {pending} came too late"]
    assert at_sink(sink, subject) == 1 and status_of(site, subject) is None
    events = tracked(site, message)
    assert ("SEND", "SMTP") in events, events
    assert ("FAIL", "ADMIN") not in events and not any(e == "DSN" for e, _ in events), "no removal, no NDR"


@pytest.mark.parametrize(("surface", "ndr"), [("viewer", True), ("viewer", False), ("cli", True), ("cli", False)])
def test_remove_during_a_delivery_that_fails_removes_it(world, surface: str, ndr: bool) -> None:
    site, sink = world["site"], world["sink"]
    subject = f"remove-{surface}-{'ndr' if ndr else 'quiet'} {uuid.uuid4().hex[:6]}"
    message = held(world, subject)
    result = act(world, surface, "remove", message["identity"], ndr=ndr)
    wait_until(lambda: status_of(site, subject) == "PendingRemove", timeout=60, message=lambda: f"{rows(site)}")
    drop_held_connections(sink)
    assert result() == ["Removed" + ("" if ndr else " without NDR")]
    assert status_of(site, subject) is None
    assert ("FAIL", "ADMIN") in tracked(site, message)
    if ndr:
        site.wait_for_subject("alice@contoso.com", f"Undeliverable: {subject}", timeout=60)
    assert at_sink(sink, subject) == 0


def test_a_delivery_held_past_its_lease_keeps_it_and_goes_out_once(world) -> None:
    """The send connector renews its leases while the next hop holds it (lease_time is 8 s):
    the sweeper never takes the message back to deliver it a second time."""
    site, sink = world["site"], world["sink"]
    subject = f"renewed {uuid.uuid4().hex[:6]}"
    message = held(world, subject)
    lease = site.r.hget(f"my:item:{message['id']}", "lease")
    lease_s = make_org().transport.lease_time
    deadline = time.monotonic() + 1.5 * lease_s
    while time.monotonic() < deadline:
        assert site.r.hget(f"my:item:{message['id']}", "lease") == lease, "the lease changed hands"
        time.sleep(0.5)
    assert status_of(site, subject) == "Active"
    sink.release()
    wait_until(lambda: at_sink(sink, subject) == 1 and status_of(site, subject) is None, timeout=60,
               message=lambda: f"{rows(site)}")
    # (had the sweeper taken it back, the first delivery's outcome would not apply: still queued)
    assert [e for e, _ in tracked(site, message)].count("SEND") == 1


def test_an_action_on_a_message_that_has_left_its_queue_creates_nothing(world, tmp_path: Path) -> None:
    site, sink = world["site"], world["sink"]
    subject = f"gone {uuid.uuid4().hex[:6]}"
    message = held(world, subject)
    sink.release()
    wait_until(lambda: at_sink(sink, subject) == 1 and status_of(site, subject) is None, timeout=60)
    proc = mailyard(site, "message", "suspend", message["identity"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "no message" in err, (out, err)
    assert site.r.exists(f"my:item:{message['id']}") == 0, "the late action re-created nothing"
