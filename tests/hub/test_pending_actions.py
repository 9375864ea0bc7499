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
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mailyard.hub.queue_rows import message_rows
from mailyard.internet.dns import MX, A, DnsServer, Zone
from mailyard.internet.sink import Mode, Sink
from mailyard.org import Organization
from mailyard.site.redis_server import free_port
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT, make_org
from tests.hub.test_viewer import TOKEN, spawn_viewer, viewer_url

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
    port = free_port()
    sink = Sink(tmp / "sink", host="127.0.0.5", port=port)
    sink.start()
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


def drop_held_connections(sink: Sink) -> None:
    """The next hop goes away: every held connection drops (the delivery fails), then it is back."""
    sink.set_mode(Mode.REFUSE)
    sink.release()
    sink.set_mode(Mode.ACCEPT)


def test_suspend_during_a_delivery_that_fails_leaves_it_suspended_until_resumed(world) -> None:
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


def test_suspend_during_a_delivery_that_succeeds_says_it_came_too_late(world) -> None:
    site, sink = world["site"], world["sink"]
    subject = f"too-late {uuid.uuid4().hex[:6]}"
    message = held(world, subject)
    waiting = mailyard(site, "message", "suspend", message["identity"], "--wait", "60")
    wait_until(lambda: status_of(site, subject) == "PendingSuspend", timeout=60, message=lambda: f"{rows(site)}")
    sink.release()
    result = finished(waiting)
    assert [d["result"] for d in result["done"]] == ["delivered: the PendingSuspend came too late"]
    assert at_sink(sink, subject) == 1 and status_of(site, subject) is None


@pytest.mark.parametrize("ndr", [True, False])
def test_remove_through_the_viewer_during_a_delivery_that_fails_removes_it(world, ndr: bool) -> None:
    site, sink = world["site"], world["sink"]
    subject = f"remove-{'ndr' if ndr else 'quiet'} {uuid.uuid4().hex[:6]}"
    message = held(world, subject)
    answer: dict[str, Any] = {}

    def act() -> None:
        with httpx.Client(base_url=world["viewer"], timeout=90) as api:
            response = api.post("/api/messages/actions", headers={"Authorization": f"Bearer {TOKEN}"},
                                json={"action": "remove", "identities": [message["identity"]], "ndr": ndr,
                                      "wait": 60})
            answer["status"], answer["body"] = response.status_code, response.json()

    thread = threading.Thread(target=act)
    thread.start()
    wait_until(lambda: status_of(site, subject) == "PendingRemove", timeout=60, message=lambda: f"{rows(site)}")
    drop_held_connections(sink)
    thread.join(timeout=90)
    assert answer["status"] == 200, answer
    assert [d["result"] for d in answer["body"]["done"]] == ["Removed" + ("" if ndr else " without NDR")]
    assert status_of(site, subject) is None
    if ndr:
        site.wait_for_subject("alice@contoso.com", f"Undeliverable: {subject}", timeout=60)
    assert at_sink(sink, subject) == 0


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
