"""The Queue Viewer's JSON API over a real HTTP socket, against a running cluster: a queue made
to wait (suspended), its messages and recipients, filters (bad ones too), actions one by one
and in bulk, export, tracking, hubs, the token, and JSON errors for everything that fails."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mailyard.hub.queue_viewer import MAX_BODY
from mailyard.testing.cluster import Cluster, Proc
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT, make_org

CAROL_QUEUE = "Amsterdam\\MBX-AMS-02"
TOKEN = "viewer-test-token"
METRICS_TOKEN = "viewer-test-metrics-token"


def spawn_viewer(cluster: Cluster, name: str, *args: str) -> Proc:
    """Start `mailyard viewer` on a free port (see ``viewer_url``)."""
    return cluster._spawn(name, "viewer", ["viewer", "--port", "0", *args], None)


def viewer_url(cluster: Cluster, proc: Proc) -> str:
    """The URL the viewer prints, once it answers /health."""
    def printed() -> str | None:
        if not proc.alive:
            raise AssertionError(f"{proc.name} exited: {cluster.tail(proc.name)}")
        found = re.search(r"Queue Viewer: (http://127\.0\.0\.1:\d+)/", proc.log.read_text(errors="replace"))
        return found.group(1) if found else None

    url = wait_until(printed, timeout=30, message=lambda: cluster.tail(proc.name))
    wait_until(lambda: httpx.get(url + "/health", timeout=5).status_code == 200, timeout=30,
               message=lambda: cluster.tail(proc.name))
    return url


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(redis_server.new_db(), tmp_path_factory.mktemp("viewer"), make_org(), cwd=ROOT)
    try:
        cluster.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
        hub = cluster.start_hub("Amsterdam", "view-1", wait=False)
        viewers = [spawn_viewer(cluster, "viewer"),
                   spawn_viewer(cluster, "viewer-token", "--token", TOKEN, "--metrics-token", METRICS_TOKEN)]
        cluster.wait_hub(hub)
        # The queue to MBX-AMS-02 exists once it carried a message
        cluster.send("alice@contoso.com", ["carol@contoso.com"], subject="first")
        cluster.wait_for_subject("carol@contoso.com", "first")
        cluster.viewer_url, cluster.token_url = (viewer_url(cluster, p) for p in viewers)  # type: ignore[attr-defined]
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def api(site: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=site.viewer_url, timeout=30) as client:  # type: ignore[attr-defined]
        yield client


@pytest.fixture
def held(site: Cluster, api: httpx.Client) -> Iterator[str]:
    """Carol's queue suspended for the test (and resumed after it)."""
    response = api.post("/api/queues/actions", json={"action": "suspend", "queues": [CAROL_QUEUE]})
    assert response.status_code == 200, response.text
    yield CAROL_QUEUE
    api.post("/api/queues/actions", json={"action": "resume", "queues": [CAROL_QUEUE]})


def subject(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:8]}"


def mailyard(site: Cluster, *args: str) -> Any:
    result = subprocess.run([sys.executable, "-m", "mailyard", *args, "--redis-url", site.redis_url],
                            capture_output=True, text=True, cwd=ROOT, timeout=60,
                            env={**os.environ, "MAILYARD_REDIS_URL": ""})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def waiting(api: httpx.Client, subj: str, queue: str = CAROL_QUEUE) -> dict[str, Any]:
    """The message with this subject, once it waits in ``queue``."""
    def found() -> dict[str, Any] | None:
        rows = api.get("/api/messages", params={"queue": queue}).json()
        return next((m for m in rows if m["subject"] == subj), None)
    return wait_until(found, timeout=30, message=f"{subj!r} never waited in {queue}")


def queue_row(api: httpx.Client, identity: str) -> dict[str, Any]:
    return next(q for q in api.get("/api/queues").json() if q["identity"] == identity)


# region: queues and messages


def test_a_suspended_queue_holds_mail_visibly_and_delivers_it_when_resumed(site, api, held) -> None:
    s = subject("held")
    site.send("alice@contoso.com", ["carol@contoso.com", "bob@contoso.com"], subject=s)
    site.wait_for_subject("bob@contoso.com", s)  # Bob's copy goes: his queue is not suspended

    msg = waiting(api, s)
    assert msg["queue"] == CAROL_QUEUE and msg["identity"].startswith(CAROL_QUEUE + "\\")
    assert msg["from_address"] == "alice@contoso.com" and msg["status"] == "Ready"
    assert [(r["address"], r["status"]) for r in msg["recipients"]] == [("carol@contoso.com", "Ready")]
    assert msg["size"] > 0 and msg["date_received"] and msg["retry_count"] == 0

    row = queue_row(api, CAROL_QUEUE)
    assert row["status"] == "Suspended" and row["message_count"] == 1
    assert row["delivery_type"] == "MapiDelivery" and row["next_hop_domain"] == "MBX-AMS-02"
    # what each queue is for comes with it, for the page to decide by (never by the name)
    assert (row["kind"], msg["queue_kind"]) == ("delivery", "delivery")
    assert queue_row(api, "Amsterdam\\Submission")["kind"] == "submission"
    assert queue_row(api, "Amsterdam\\Unreachable")["kind"] == "unreachable"

    suspended = api.get("/api/queues", params={"filter": "Status -eq Suspended"}).json()
    assert [q["identity"] for q in suspended] == [CAROL_QUEUE]
    by_count = api.get("/api/queues", params={"sort": "-MessageCount"}).json()
    assert by_count[0]["identity"] == CAROL_QUEUE
    assert api.get("/api/queues", params={"server": "view-1"}).json()
    assert api.get("/api/queues", params={"server": "nohub"}).status_code == 404

    # exactly what the CLI prints (the same functions)
    assert mailyard(site, "queue", "list", "--filter", "Status -eq Suspended", "--json") == suspended
    cli = mailyard(site, "queue", "messages", CAROL_QUEUE, "--json")
    mine = api.get("/api/messages", params={"queue": CAROL_QUEUE}).json()
    strip = lambda rows: [{k: v for k, v in m.items() if k != "age_seconds"} for m in rows]  # noqa: E731
    assert strip(cli) == strip(mine)

    resumed = api.post("/api/queues/actions", json={"action": "resume", "queues": [CAROL_QUEUE]})
    assert resumed.status_code == 200
    assert resumed.json() == {"count": 1, "done": [{"identity": CAROL_QUEUE, "result": "Resumed"}], "failed": []}
    site.wait_for_subject("carol@contoso.com", s)
    wait_until(lambda: queue_row(api, CAROL_QUEUE)["message_count"] == 0, timeout=30)
    assert queue_row(api, CAROL_QUEUE)["status"] != "Suspended"


def test_messages_filter_across_queues_and_limit(site, api, held) -> None:
    s = subject("filtered")
    for n in range(3):
        site.send("dave@contoso.com", ["carol@contoso.com"], subject=f"{s} #{n}")
    for n in range(3):
        waiting(api, f"{s} #{n}")
    everywhere = api.get("/api/messages", params={"filter": f"Subject -like '{s}*'"}).json()
    assert sorted(m["subject"] for m in everywhere) == [f"{s} #{n}" for n in range(3)]
    from_dave = api.get("/api/messages", params={"filter": "FromAddress -eq dave@contoso.com -and "
                                                 "RecipientDomains -eq contoso.com", "sort": "-DateReceived"})
    assert {m["subject"] for m in from_dave.json()} >= {f"{s} #{n}" for n in range(3)}
    assert len(api.get("/api/messages", params={"queue": CAROL_QUEUE, "limit": 2}).json()) == 2
    removed = api.post("/api/messages/actions", json={"action": "remove", "filter": f"Subject -like '{s}*'",
                                                      "queue": CAROL_QUEUE, "ndr": False}).json()
    assert removed["count"] == 3 and not removed["failed"]


def test_bad_filters_and_sorts_get_a_400_that_points_at_the_bad_part(api) -> None:
    for path in ("/api/queues", "/api/messages"):
        response = api.get(path, params={"filter": "Status -eq Bogus"})
        assert response.status_code == 400, response.text
        lines = response.json()["error"].split("\n")
        assert len(lines) == 3, lines
        assert lines[1].strip() == "Status -eq Bogus"
        caret = lines[2].index("^")
        assert lines[1][caret:].startswith("Bogus"), lines
    unfinished = api.get("/api/queues", params={"filter": "MessageCount -gt"}).json()["error"]
    assert unfinished.count("\n") == 2 and unfinished.rstrip().endswith("^")
    sort = api.get("/api/queues", params={"sort": "Colour"})
    assert sort.status_code == 400 and "Colour" in sort.json()["error"]
    bulk = api.post("/api/queues/actions", json={"action": "suspend", "filter": "Status -eq"})
    assert bulk.status_code == 400 and "^" in bulk.json()["error"]
    bulk = api.post("/api/messages/actions", json={"action": "remove", "filter": "Size -gt lots"})
    assert bulk.status_code == 400 and "^" in bulk.json()["error"]


def test_remove_by_filter_with_and_without_an_ndr(site, api, held) -> None:
    with_ndr, without = subject("remove with ndr"), subject("remove silently")
    site.send("alice@contoso.com", ["carol@contoso.com"], subject=with_ndr)
    site.send("alice@contoso.com", ["carol@contoso.com"], subject=without)
    waiting(api, with_ndr)
    silent_msg = waiting(api, without)

    removed = api.post("/api/messages/actions", json={
        "action": "remove", "filter": f"Subject -eq '{with_ndr}'", "queue": CAROL_QUEUE}).json()
    assert removed["count"] == 1 and removed["done"][0]["result"] == "Removed", removed
    removed = api.post("/api/messages/actions", json={
        "action": "remove", "filter": f"Subject -eq '{without}' -and FromAddress -eq alice@contoso.com",
        "ndr": False}).json()
    assert removed == {"count": 1, "done": [{"identity": silent_msg["identity"], "result": "Removed without NDR"}],
                       "failed": []}

    (ndr,) = site.wait_for_subject("alice@contoso.com", f"Undeliverable: {with_ndr}")
    assert ndr["from"].lower().startswith("postmaster@")
    # the NDR is written with the removal (one transaction): none exists for the silent one
    reports = api.get("/api/track", params={"event": "DSN"}).json()
    assert not [r for r in reports if r["reference"] == silent_msg["message_id"]]
    assert [r for r in reports if r["subject"] == f"Undeliverable: {with_ndr}"]
    gone = api.get("/api/messages", params={"queue": CAROL_QUEUE}).json()
    assert not [m for m in gone if m["subject"] in (with_ndr, without)]
    # nothing matched: nothing to do, and that is not an error
    assert api.post("/api/messages/actions", json={"action": "remove", "filter": f"Subject -eq '{without}'"}
                    ).json() == {"count": 0, "done": [], "failed": []}


def test_export_suspend_and_resume_one_message(site, api, held) -> None:
    s = subject("export me")
    site.send("alice@contoso.com", ["carol@contoso.com"], subject=s, body="the body to export")
    msg = waiting(api, s)
    identity = msg["identity"]

    # the queue is suspended, not the message: Export-Message refuses it
    refused = api.get("/api/messages/export", params={"identity": identity})
    assert refused.status_code == 409 and "suspend it" in refused.json()["error"]

    done = api.post("/api/messages/actions", json={"action": "suspend", "identities": [identity]}).json()
    assert done == {"count": 1, "done": [{"identity": identity, "result": "Suspended"}], "failed": []}
    assert api.get("/api/messages", params={"queue": CAROL_QUEUE, "filter": "Status -eq Suspended"}
                   ).json()[0]["identity"] == identity
    exported = api.get("/api/messages/export", params={"identity": identity})
    assert exported.status_code == 200, exported.text
    assert exported.headers["content-type"].startswith("message/rfc822")
    assert "attachment" in exported.headers["content-disposition"]
    assert f"Subject: {s}".encode() in exported.content and b"the body to export" in exported.content
    # the short identity works too, and the CLI exports the same bytes
    assert api.get("/api/messages/export", params={"identity": msg["id"]}).content == exported.content

    resumed = api.post("/api/messages/actions", json={"action": "resume", "identities": [identity]}).json()
    assert resumed["done"] == [{"identity": identity, "result": "Ready"}]
    assert api.get("/api/messages/export", params={"identity": identity}).status_code == 409
    assert api.get("/api/messages/export", params={"identity": "Amsterdam\\MBX-AMS-02\\999999"}).status_code == 404
    assert api.get("/api/messages/export", params={"identity": "nonsense"}).status_code == 404
    api.post("/api/messages/actions", json={"action": "remove", "identities": [identity], "ndr": False})


def test_refused_actions_report_per_item_or_409_when_nothing_was_done(api, held) -> None:
    unknown = "Amsterdam\\Nowhere"
    partial = api.post("/api/queues/actions", json={"action": "resume", "queues": [unknown, CAROL_QUEUE]})
    assert partial.status_code == 200
    body = partial.json()
    assert body["count"] == 1 and body["done"] == [{"identity": CAROL_QUEUE, "result": "Resumed"}]
    assert body["failed"][0]["identity"] == unknown and "no queue" in body["failed"][0]["error"]

    nothing = api.post("/api/queues/actions", json={"action": "suspend", "queues": [unknown]})
    assert nothing.status_code == 409
    assert nothing.json()["error"].startswith(unknown) and nothing.json()["count"] == 0
    api.post("/api/queues/actions", json={"action": "suspend", "queues": [CAROL_QUEUE]})
    retry = api.post("/api/queues/actions", json={"action": "retry", "queues": [CAROL_QUEUE]})
    assert retry.status_code == 409 and "resume it first" in retry.json()["error"]
    missing = api.post("/api/messages/actions", json={"action": "suspend", "identities": ["424242"]})
    assert missing.status_code == 409 and missing.json()["failed"][0]["identity"] == "424242"
    assert api.get("/api/messages", params={"queue": unknown}).status_code == 404


# endregion

# region: tracking, hubs, page


def test_tracking_search_and_hubs(site, api) -> None:
    s = subject("tracked")
    sent = site.send("bob@contoso.com", ["alice@contoso.com"], subject=s)
    site.wait_for_subject("alice@contoso.com", s)
    path = wait_until(lambda: (p := api.get("/api/track", params={"message_id": sent["message_id"]}).json())
                      and "DELIVER" in [r["event"] for r in p] and p, timeout=30)
    events = [r["event"] for r in path]
    assert "RECEIVE" in events and events.index("RECEIVE") < events.index("DELIVER"), events
    assert path == mailyard(site, "track", "--message-id", sent["message_id"], "--json")
    delivered = api.get("/api/track", params={"sender": "bob@contoso.com", "event": "deliver"}).json()
    assert s in [r["subject"] for r in delivered]
    assert api.get("/api/track", params={"recipient": "alice@contoso.com", "start": "2999-01-01T00:00:00"}
                   ).json() == []
    assert api.get("/api/track", params={"event": "EXPLODE"}).status_code == 400
    bad_time = api.get("/api/track", params={"start": "yesterday"})
    assert bad_time.status_code == 400 and bad_time.json()["error"].startswith("start:")

    (hub,) = api.get("/api/hubs").json()
    assert hub["name"] == "view-1" and hub["site"] == "Amsterdam" and hub["alive"] is True
    assert hub["endpoints"].get("Default")


@pytest.mark.parametrize(("params", "needle"), [
    ({"start": "1960-01-01"}, "start: '1960-01-01' is before 1970"),
    ({"end": "1969-12-31T23:59:59"}, "end: '1969-12-31T23:59:59' is before 1970"),
    ({"start": "1970-01-01T00:00:00+05:00"}, "start: "),
    ({"start": "0001-01-01"}, "start: "),
    ({"end": "2026-13-01"}, "end: '2026-13-01' is not a time"),
    ({"start": "\x00"}, "start: "),
])
def test_a_tracking_time_before_1970_or_not_a_time_is_a_400_naming_it(api, params, needle: str) -> None:
    response = api.get("/api/track", params=params)
    assert response.status_code == 400 and needle in response.json()["error"], response.text


def test_tracking_times_at_the_ends_of_the_calendar(site, api) -> None:
    assert api.get("/api/track", params={"start": "1970-01-01"}).json(), "the site has tracked mail"
    assert api.get("/api/track", params={"start": "9999-12-31T23:59:59.999-23:59"}).json() == []
    assert api.get("/api/track", params={"end": "1970-01-01T00:00:00Z"}).json() == [], "the end is exclusive"
    assert api.get("/api/track", params={"end": "9999-12-31", "limit": 1}).json()


def test_the_page_and_its_files_are_served(api) -> None:
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Queue Viewer" in page.text and 'id="queues"' in page.text
    for path in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        asset = api.get(path)
        assert asset.status_code == 200, path
    assert api.get("/static/nothing.js").json()["error"]
    health = api.get("/health").json()
    assert health["status"] == "ok" and health["token_required"] is False


def test_the_consoles_reads_answer_bad_requests_clearly(api) -> None:
    shape = api.get("/api/shape", params={"by": "colour"})
    assert shape.status_code == 400 and "by: one of queue, domain, sender" in shape.json()["error"]
    assert api.get("/api/shape").json()["rows"][0]["destination"] == "TOTAL"
    nobody = api.get("/api/hubs/nobody")
    assert nobody.status_code == 404 and "no hub 'nobody'" in nobody.json()["error"]
    for bad in ("0", "1441", "an hour"):
        flow = api.get("/api/flow", params={"minutes": bad})
        assert flow.status_code == 400 and "minutes" in flow.json()["error"], flow.text


# endregion

# region: errors and the token


def test_every_error_is_json(api) -> None:
    def error(response: httpx.Response, status: int) -> str:
        assert response.status_code == status, (response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/json")
        return response.json()["error"]

    assert "/api/nothing" in error(api.get("/api/nothing"), 404)
    assert "DELETE" in error(api.delete("/api/queues"), 405)
    assert error(api.get("/api/queues/actions"), 405)
    big = b'{"action": "suspend", "queues": ["' + b"x" * (1024 * 1024 + 10) + b'"]}'
    assert "limit" in error(api.post("/api/queues/actions", content=big,
                                     headers={"Content-Type": "application/json"}), 413)
    assert "JSON" in error(api.post("/api/queues/actions", content=b"{nope",
                                    headers={"Content-Type": "application/json"}), 400)
    assert "action" in error(api.post("/api/queues/actions", json={"queues": ["x"]}), 400)
    assert "action" in error(api.post("/api/queues/actions", json={"action": "explode", "queues": ["x"]}), 400)
    assert "colour" in error(api.post("/api/queues/actions", json={"action": "resume", "queues": ["x"],
                                                                   "colour": "red"}), 400)
    assert "exactly one" in error(api.post("/api/queues/actions", json={"action": "resume"}), 400)
    assert "exactly one" in error(api.post("/api/messages/actions", json={
        "action": "remove", "identities": ["1"], "filter": "Size -gt 0"}), 400)
    assert "resubmit" in error(api.post("/api/queues/actions", json={"action": "suspend", "queues": ["x"],
                                                                      "resubmit": True}), 400)
    assert "queues" in error(api.post("/api/queues/actions", json={"action": "resume", "queues": "x"}), 400)
    assert "limit" in error(api.get("/api/messages", params={"limit": "many"}), 400)
    assert "limit" in error(api.get("/api/messages", params={"limit": 0}), 400)
    assert "identity" in error(api.get("/api/messages/export"), 400)
    # on loopback it answers only to loopback names (no DNS rebinding from a web page)
    assert "rebound.example" in error(api.get("/api/queues", headers={"Host": "rebound.example"}), 400)
    assert api.get("/health", headers={"Host": "localhost:1234"}).status_code == 200
    assert "application/json" in error(api.post("/api/queues/actions", content=b"action=suspend",
                                                headers={"Content-Type": "application/x-www-form-urlencoded"}),
                                       415)


@pytest.mark.parametrize("path", ["/api/queues/actions", "/api/messages/actions"])
@pytest.mark.parametrize(("body", "needle"), [
    (b"[" * 100_000, "body is not JSON"),  # nested too deeply for a recursive parser
    (b'{"action": "suspend", "queues": ' + b"[" * 100_000, "body is not JSON"),
    (b'{"action": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001, "body is not JSON"),
    (b"", "body is not JSON"),
    (b'{"action": "suspend"} and more', "body is not JSON"),
    (b"\xff\xfe\x00{", "body is not JSON"),
    (b'{"action": "suspend", "identities": ["\\ud800"], "queues": ["\\ud800"]}', "body is not JSON"),  # (lone surrogate)
    (b"null", "body: Input should be an object"),
    (b"[]", "body: Input should be an object"),
    (b'"suspend"', "body: Input should be an object"),
    (b'{"action": ["suspend"]}', "action:"),
    (b'{"action": "suspend", "filter": 7}', "filter:"),
])
def test_a_bad_action_body_is_a_400_naming_what_is_wrong(api, path: str, body: bytes, needle: str) -> None:
    response = api.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, (response.status_code, response.text[:300])
    assert needle in response.json()["error"], response.text[:300]


READS = [("/api/queues", {}), ("/api/messages", {}), ("/api/track", {"sender": "alice@contoso.com"}),
         ("/api/hubs", {}), ("/api/messages/export", {"identity": "Amsterdam\\MBX-AMS-02\\999999"}),
         ("/metrics", {}), ("/api/nothing", {}), ("/api/flow", {}), ("/api/shape", {"by": "domain"}),
         ("/api/connectors", {}), ("/api/hubs/nobody", {})]


def test_with_a_token_actions_need_it(site) -> None:
    url = site.token_url
    body = {"action": "resume", "queues": [CAROL_QUEUE]}
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").json()["token_required"] is True
        missing = client.post("/api/queues/actions", json=body)
        assert missing.status_code == 401 and "Bearer" in missing.json()["error"]
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = client.post("/api/queues/actions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and wrong.json()["error"]
        right = client.post("/api/queues/actions", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 200 and right.json()["count"] == 1
        messages = client.post("/api/messages/actions", json={"action": "suspend", "identities": ["1"]})
        assert messages.status_code == 401
        # the token is checked before the body is read: no 413 or 415 for a stranger
        big = client.post("/api/queues/actions", content=b"x" * (MAX_BODY + 10), headers={"Content-Type": "text/plain"})
        assert big.status_code == 401


@pytest.mark.parametrize(("path", "params"), READS, ids=[p for p, _ in READS])
def test_with_a_token_reads_need_it_too(site, path: str, params: dict[str, str]) -> None:
    """/api/track shows every sender, recipient and subject; export, whole messages."""
    with httpx.Client(base_url=site.token_url, timeout=30) as client:
        missing = client.get(path, params=params)
        assert missing.status_code == 401, missing.text
        assert missing.headers["content-type"].startswith("application/json") and "Bearer" in missing.json()["error"]
        assert missing.headers["www-authenticate"] == 'Bearer realm="Mailyard Queue Viewer"'
        assert missing.headers["cache-control"] == "no-store"
        assert client.get(path, params=params, headers={"Authorization": "Basic " + TOKEN}).status_code == 401
        wrong = client.get(path, params=params, headers={"Authorization": "Bearer contoso-demo-viewer-token"})
        assert wrong.status_code == 403 and wrong.json()["error"] == "wrong token"
        right = client.get(path, params=params, headers={"Authorization": f"bearer  {TOKEN}"})
        wanted = {"/api/messages/export": 404, "/api/nothing": 404, "/api/hubs/nobody": 404}.get(path, 200)
        assert right.status_code == wanted, right.text
        # The metrics token opens /metrics and nothing else.
        scraper = client.get(path, params=params, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        if path == "/metrics":
            assert scraper.status_code == 200 and "mailyard_queue_messages" in scraper.text
        else:
            assert scraper.status_code == 403 and "/metrics only" in scraper.json()["error"]


def test_with_a_token_the_page_and_health_stay_open_and_show_no_mail(site) -> None:
    with httpx.Client(base_url=site.token_url, timeout=30) as client:
        page = client.get("/")
        assert page.status_code == 200 and 'id="logon-form"' in page.text
        for path in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
            assert client.get(path).status_code == 200, path
        assert client.get("/health").json() == {"status": "ok", "service": "queue viewer", "token_required": True}


def refused_to_start(site: Cluster, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "mailyard", "viewer", "--port", "0", *args,
                             "--redis-url", site.redis_url], capture_output=True, text=True, cwd=ROOT, timeout=60,
                            env={**{k: v for k, v in os.environ.items() if not k.startswith("MAILYARD_VIEWER")},
                                 **(env or {})})
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Queue Viewer:" not in result.stdout, "it must not have started listening"
    return result.stderr


@pytest.mark.parametrize("placeholder", ["contoso-demo-viewer-token", "contoso-demo-token-change-me", "CHANGE-ME"])
def test_a_placeholder_token_never_works(site, placeholder: str) -> None:
    err = refused_to_start(site, "--token", placeholder)
    assert "well-known placeholder" in err and "--token" in err
    err = refused_to_start(site, env={"MAILYARD_VIEWER_TOKEN": placeholder})
    assert "well-known placeholder" in err
    err = refused_to_start(site, "--token", TOKEN, "--metrics-token", placeholder)
    assert "--metrics-token" in err and "placeholder" in err


def test_without_a_token_it_refuses_an_address_that_is_not_loopback(site) -> None:
    err = refused_to_start(site, "--host", "0.0.0.0")
    assert "0.0.0.0" in err and "needs a token" in err
    assert "needs --token" in refused_to_start(site, "--metrics-token", METRICS_TOKEN)


# endregion


def test_with_a_secrets_dir_it_generates_its_tokens_once_and_needs_them(site, tmp_path) -> None:
    """As docker compose runs it: no token given, the tokens kept in a volume of its own."""
    secrets_dir = tmp_path / "viewer"
    urls = []
    for run in ("first", "second"):
        proc = spawn_viewer(site, f"viewer-secrets-{run}", "--secrets-dir", str(secrets_dir))
        try:
            urls.append(viewer_url(site, proc))
            path = secrets_dir / "secrets.toml"
            assert path.stat().st_mode & 0o777 == 0o600
            token = re.search(r'^token = "([^"]+)"', path.read_text(), re.M).group(1)
            if run == "first":
                first_token = token
            assert token == first_token, "the same token after a restart"
            assert httpx.get(urls[-1] + "/api/queues", timeout=10).status_code == 401
            ok = httpx.get(urls[-1] + "/api/queues", headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert ok.status_code == 200
        finally:
            site.kill(proc.name)
