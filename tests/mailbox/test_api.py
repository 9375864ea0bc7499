"""The mailbox server's HTTP API, over a socket to a real server: bad requests get a 4xx
with a JSON error that names the problem, and nothing is half-written."""

from __future__ import annotations

import base64
import json
import os
import signal
import smtplib
import time
import uuid

import httpx
import pytest

from mailyard import registry, tracking
from mailyard.pki import Identity
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT, make_org


@pytest.fixture(scope="module")
def api(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory):
    cluster = Cluster(redis_server.new_db(), tmp_path_factory.mktemp("api"), make_org(), cwd=ROOT)
    try:
        cluster.start_mailbox("MBX-AMS-01")
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def base(api: Cluster) -> str:
    return registry.server_url(api.r, "MBX-AMS-01")


@pytest.fixture(scope="module")
def hub(api: Cluster) -> httpx.Client:
    """A client with the certificate of Amsterdam's hubs, as the store driver has it."""
    return api.client(cert=Identity.hub("Amsterdam"))


def error_of(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return response.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "status", "needle"),
    [
        ("GET", "/mailboxes/nobody@contoso.com/folders/Inbox", 404, "no mailbox nobody@contoso.com"),
        ("GET", "/mailboxes/carol@contoso.com/folders/Inbox", 404, "no mailbox carol@contoso.com on MBX-AMS-01"),
        ("GET", "/mailboxes/alice@contoso.com/folders/Junk", 404, "no folder 'Junk'"),
        ("GET", "/mailboxes/alice@contoso.com/folders/Inbox/..%2F..%2Fetc%2Fpasswd", 404, ""),
        ("GET", "/mailboxes/..%2F..%2Fetc/folders/Inbox", 404, "no such path"),
        ("DELETE", "/mailboxes/alice@contoso.com/outbox", 405, "DELETE is not allowed"),
        ("GET", "/mailboxes/alice@contoso.com/folders/Inbox/1.nope.host", 404, "no item"),
    ],
)
def test_unknown_things_are_404_with_a_reason(api, base, method, path, status, needle) -> None:
    response = api.http.request(method, base + path)
    assert response.status_code == status
    assert needle in error_of(response)


def test_the_hub_api_needs_the_client_certificate_of_a_hub_of_the_servers_site(api, base, hub) -> None:
    url = base + "/hub/deliver"
    body = {"messages": [{"id": "m1", "recipients": ["alice@contoso.com"], "raw": ""}]}
    anonymous = api.http.post(url, json=body)  # (a password logon is no hub's)
    assert anonymous.status_code == 401 and "client certificate" in error_of(anonymous)
    for other in (Identity.hub("London"), Identity.mailbox("MBX-AMS-02")):
        with api.client(cert=other) as client:
            refused = client.post(url, json=body)
            assert refused.status_code == 403, f"{other}: {refused.status_code}"
            assert "only hubs of site Amsterdam" in error_of(refused)
            assert client.post(base + "/hub/outbox/take", json={"limit": 1}).status_code == 403
    assert api.http.post(base + "/hub/outbox/take", json={"limit": 1}).status_code == 401
    body["messages"][0]["raw"] = base64.b64encode(b"Subject: from a hub\r\n\r\nx\r\n").decode()
    assert hub.post(url, json=body).status_code == 200, "a hub of the site may deliver"


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"not json", "body is not JSON"),
        (b'{"messages": []}', "messages: expected a non-empty list"),
        (b'{"messages": [1]}', "messages[0]: expected an object"),
        (json.dumps({"messages": [{"id": "../x", "recipients": ["a@contoso.com"], "raw": ""}]}).encode(),
         "messages[0].id"),
        (json.dumps({"messages": [{"id": "m", "recipients": [], "raw": ""}]}).encode(), "messages[0].recipients"),
        (json.dumps({"messages": [{"id": "m", "recipients": ["alice@contoso.com"], "raw": "%%%"}]}).encode(),
         "messages[0].raw: not valid base64"),
    ],
)
def test_bad_deliveries_are_400_naming_the_field(hub, base, payload: bytes, needle: str) -> None:
    response = hub.post(base + "/hub/deliver", content=payload, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert needle in error_of(response)


def test_delivery_to_a_mailbox_of_another_server_is_a_permanent_failure(api, base, hub) -> None:
    raw = base64.b64encode(b"Subject: x\r\n\r\nx\r\n").decode()
    body = {"messages": [{"id": "m77", "recipients": ["carol@contoso.com", "alice@contoso.com"], "raw": raw}]}
    results = hub.post(base + "/hub/deliver", json=body).json()["results"]
    by_rcpt = {r["recipient"]: r for r in results}
    assert by_rcpt["carol@contoso.com"]["code"] == 550 and by_rcpt["carol@contoso.com"]["status"] == "5.1.1"
    assert by_rcpt["alice@contoso.com"]["code"] == 250
    again = hub.post(base + "/hub/deliver", json=body).json()["results"]
    assert {r["recipient"]: r["code"] for r in again}["alice@contoso.com"] == 250
    inbox = [i for i in api.folder("alice@contoso.com") if i["subject"] == "x"]
    assert len(inbox) == 1, "a repeated delivery is stored once"


@pytest.mark.parametrize(
    ("raw", "ctype", "status", "needle"),
    [
        (b"", "message/rfc822", 400, "the message is empty"),
        (b"Subject: nobody\r\n\r\nhi\r\n", "message/rfc822", 400, "no recipients"),
        (b"To: bob\r\nSubject: x\r\n\r\nhi\r\n", "message/rfc822", 400, "'bob' is not a valid e-mail address"),
        (b"From: bob@contoso.com\r\nTo: carol@contoso.com\r\n\r\nhi\r\n", "message/rfc822", 403,
         "may not send as bob@contoso.com from the mailbox alice@contoso.com"),
        (b'{"to": "carol@contoso.com", "colour": 1}', "application/json", 400, "unknown field(s): colour"),
        (b'{"to": [1]}', "application/json", 400, "to: expected a list of addresses"),
        (b"[1", "application/json", 400, "body is not JSON"),
        (b"x", "image/png", 415, "send message/rfc822 or application/json"),
    ],
)
def test_bad_submissions_get_a_clear_error_and_nothing_reaches_the_outbox(api, base, raw, ctype, status,
                                                                          needle) -> None:
    response = api.http.post(base + "/mailboxes/alice@contoso.com/outbox", content=raw,
                             headers={"Content-Type": ctype})
    assert response.status_code == status, response.text
    assert needle in error_of(response)
    assert api.folder("alice@contoso.com", "Outbox") == []


def test_a_message_over_the_size_limit_is_413(api, base) -> None:
    limit = api.org.transport.max_message_size
    raw = b"To: carol@contoso.com\r\nSubject: big\r\n\r\n" + b"x" * (limit + 70_000)
    response = api.http.post(base + "/mailboxes/alice@contoso.com/outbox", content=raw,
                             headers={"Content-Type": "message/rfc822"})
    assert response.status_code == 413 and "limit" in error_of(response)


def test_a_good_submission_is_accepted_with_its_id_and_message_id(api, base) -> None:
    raw = b"To: Carol <carol@contoso.com>\r\nSubject: fine\r\n\r\nhello\r\n"
    response = api.http.post(base + "/mailboxes/alice@contoso.com/outbox", content=raw,
                             headers={"Content-Type": "message/rfc822"})
    assert response.status_code == 202, response.text
    data = response.json()
    assert data["recipients"] == ["carol@contoso.com"] and data["message_id"].startswith("<")
    (item,) = api.folder("alice@contoso.com", "Outbox")  # no hub runs in this module
    stored = api.raw("alice@contoso.com", item["id"], folder="Outbox")
    assert b"From: alice@contoso.com" in stored and b"Message-ID:" in stored and b"Date:" in stored


def test_a_batch_of_sends_answers_each_message_as_its_own_send_would(api, base) -> None:
    tag = uuid.uuid4().hex[:8]
    first = {"to": ["carol@contoso.com"], "subject": f"batch {tag} 1", "message_id": f"<1.{tag}@c>"}
    messages = [
        first,
        {"to": ["bob"], "subject": f"batch {tag} bad address"},
        {"to": ["carol@contoso.com"], "subject": f"batch {tag} 2", "body": "two\n"},
        {"to": ["carol@contoso.com"], "colour": "red"},
        dict(first),  # the same Message-ID again: stored once
        {"subject": f"batch {tag} nobody"},
        "not an object",
    ]
    response = api.http.post(base + "/mailboxes/alice@contoso.com/outbox/batch", json={"messages": messages})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [202, 400, 202, 400, 202, 400, 400], results
    assert "'bob' is not a valid e-mail address" in results[1]["error"]
    assert "unknown field(s): colour" in results[3]["error"]
    assert "no recipients" in results[5]["error"] and "JSON object" in results[6]["error"]
    assert (results[0]["duplicate"], results[2]["duplicate"], results[4]["duplicate"]) == (False, False, True)
    assert results[4]["id"] == results[0]["id"] and results[0]["message_id"] == f"<1.{tag}@c>"
    assert results[2]["recipients"] == ["carol@contoso.com"]
    outbox = [s for s in api.subjects("alice@contoso.com", "Outbox") if s.startswith(f"batch {tag}")]
    assert sorted(outbox) == [f"batch {tag} 1", f"batch {tag} 2"], outbox
    assert b"two\r\n" in api.raw("alice@contoso.com", results[2]["id"], folder="Outbox")


@pytest.mark.parametrize(
    ("body", "ctype", "status", "needle"),
    [
        (b'[{"to": ["carol@contoso.com"]}]', "application/json", 400, 'expected {"messages": [...]}'),
        (b'{"messages": []}', "application/json", 400, "from 1 to 100"),
        (json.dumps({"messages": [{"to": ["carol@contoso.com"]}] * 101}).encode(), "application/json", 400,
         "from 1 to 100"),
        (b'{"messages": [], "more": 1}', "application/json", 400, 'expected {"messages": [...]}'),
        (b"To: carol@contoso.com\r\n\r\nhi\r\n", "message/rfc822", 415, "send application/json"),
        (json.dumps({"messages": [{"to": ["carol@contoso.com"] * 60}] * 100}).encode(), "application/json", 400,
         "more than 5000 recipients in all"),
    ],
)
def test_a_bad_batch_is_refused_whole_with_a_clear_error(api, base, body, ctype, status, needle) -> None:
    before = api.folder("bob@contoso.com", "Outbox")
    response = api.http.post(base + "/mailboxes/bob@contoso.com/outbox/batch", content=body,
                             headers={"Content-Type": ctype})
    assert response.status_code == status, response.text
    assert needle in error_of(response)
    assert api.folder("bob@contoso.com", "Outbox") == before


def test_sigterm_stops_a_server_at_once_with_status_0_though_a_client_keeps_a_connection_open(
        cluster_factory) -> None:
    # A TLS connection a client keeps alive (the hubs' pools do) used to hold the server for
    # asyncio's 30 s TLS shutdown, and uvicorn then ended it by the signal (status 143)
    site = cluster_factory()
    proc = site.start_mailbox("MBX-AMS-01")
    site.send("alice@contoso.com", ["bob@contoso.com"], subject="keep-alive")  # the pool's connection stays open
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.popen.wait(timeout=20) == 0, site.tail("MBX-AMS-01")


# region: duplicate detection

def test_the_same_message_id_delivered_by_two_hubs_is_stored_once(api, base, hub) -> None:
    tag = uuid.uuid4().hex[:8]
    raw = base64.b64encode(f"Subject: twice {tag}\r\nMessage-ID: <{tag}@contoso.com>\r\n\r\nx\r\n".encode()).decode()
    texts = []
    for key, name in ((f"a{tag}", "ams-1"), (f"b{tag}", "ams-2")):  # each hub's own message id
        body = {"messages": [{"id": key, "recipients": ["bob@contoso.com"], "raw": raw}]}
        (result,) = hub.post(base + "/hub/deliver", json=body, headers={"X-Mailyard-Hub": name}).json()["results"]
        assert result["code"] == 250, result
        texts.append(result["text"])
    assert texts == ["STOREDRV.Deliver: delivered", "STOREDRV.Deliver: duplicate, stored once"]
    assert api.subjects("bob@contoso.com").count(f"twice {tag}") == 1


@pytest.mark.parametrize("ctype", ["application/json", "message/rfc822"])
def test_a_client_that_sends_again_after_a_lost_answer_makes_no_second_outbox_item(api, base, ctype) -> None:
    tag = uuid.uuid4().hex[:8]
    if ctype == "application/json":
        body = json.dumps({"to": ["carol@contoso.com"], "subject": f"resent {tag}", "message_id": f"<{tag}@c>"})
    else:
        body = f"To: carol@contoso.com\r\nSubject: resent {tag}\r\nMessage-ID: <{tag}@c>\r\n\r\nhi\r\n"
    answers = [api.http.post(base + "/mailboxes/bob@contoso.com/outbox", content=body,
                             headers={"Content-Type": ctype}) for _ in range(2)]
    assert [a.status_code for a in answers] == [202, 202], answers[1].text
    first, again = (a.json() for a in answers)
    assert (first["duplicate"], again["duplicate"]) == (False, True) and again["id"] == first["id"]
    assert api.subjects("bob@contoso.com", "Outbox").count(f"resent {tag}") == 1


def smtp_in(site: Cluster, hub: str, raw: bytes) -> None:
    """A message from the Internet, into ``hub``'s Internet receive connector."""
    host, port = site.smtp(hub, "Internet")
    with smtplib.SMTP(host, port, local_hostname="sender.example", timeout=15,
                      source_address=("127.0.0.2", 0)) as client:
        client.sendmail("someone@fabrikam.example", ["bob@contoso.com"], raw)


def test_a_message_id_is_stored_once_whatever_hub_or_path_brought_it_also_after_a_restart(
        cluster_factory) -> None:
    site = cluster_factory()
    site.start_mailbox("MBX-AMS-01")
    for name in ("ams-1", "ams-2"):
        site.start_hub("Amsterdam", name)
    tag = uuid.uuid4().hex[:8]
    message_id, subject = f"<{tag}@contoso.com>", f"one copy {tag}"
    smtp_raw = f"From: someone@fabrikam.example\r\nTo: bob@contoso.com\r\nSubject: {subject}\r\n" \
               f"Message-ID: {message_id}\r\n\r\nthe same message, by another path\r\n".encode()

    def deliveries() -> list[tracking.Record]:
        return [r for r in tracking.search(site.r, message_id=message_id, event="DELIVER")
                if "bob@contoso.com" in r.recipients]

    def delivered(count: int) -> list[tracking.Record]:
        """Once ``count`` deliveries of the message to bob have been answered, stored or not."""
        wait_until(lambda: len(deliveries()) >= count, timeout=60,
                   message=lambda: f"{count} deliveries of {message_id}: {deliveries()}\n{site.all_logs(20)}")
        records = deliveries()
        assert len(records) == count, records
        return records

    # Given it in bob's Inbox, sent by alice through the mailbox API (Outbox, a hub, the Inbox)
    site.send("alice@contoso.com", ["bob@contoso.com"], subject=subject, message_id=message_id)
    site.wait_for_subject("bob@contoso.com", subject)
    # When it comes again from the Internet, through either hub's Internet receive connector
    smtp_in(site, "ams-1", smtp_raw)
    smtp_in(site, "ams-2", smtp_raw)
    # Then both deliveries are answered "duplicate", and bob has it once
    records = delivered(3)
    assert [("duplicate" in " ".join(r.recipient_status)) for r in records] == [False, True, True], records
    assert site.subjects("bob@contoso.com").count(subject) == 1

    # When the copy is older than the window (2 days), the message is stored again
    (item,) = [i for i in site.folder("bob@contoso.com") if i["subject"] == subject]
    (path,) = (site.data_dir / "mailboxes" / "MBX-AMS-01" / "bob@contoso.com" / "new").glob(item["id"])
    three_days_ago = time.time() - 3 * 86400
    os.utime(path, (three_days_ago, three_days_ago))
    smtp_in(site, "ams-1", smtp_raw)
    delivered(4)
    assert site.subjects("bob@contoso.com").count(subject) == 2

    # And a restarted mailbox server still knows the new copy (its index is rebuilt from disk)
    site.kill("MBX-AMS-01", signal.SIGTERM)
    site.start_mailbox("MBX-AMS-01")
    smtp_in(site, "ams-2", smtp_raw)
    assert "duplicate" in " ".join(delivered(5)[-1].recipient_status)
    assert site.subjects("bob@contoso.com").count(subject) == 2
    resent = site.send("alice@contoso.com", ["bob@contoso.com"], subject=subject, message_id=message_id)
    assert resent["duplicate"], "the Sent Items copy is a duplicate too, after the restart"

# endregion
