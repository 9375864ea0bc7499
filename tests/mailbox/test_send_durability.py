"""A Send whose Outbox write fails half way (the file renamed in, its directory's fsync failed):
answered 503, and the retry the answer asks for finds the copy and makes it leave, once.

The API runs in process (Starlette's TestClient) so that the disk's failure can be made at the
one call where it happens, ``_fsync_dir``, as tests/mailbox/test_store.py does; Redis is real.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mailyard import redisconn
from mailyard.directory import Directory
from mailyard.mailbox import api
from mailyard.mailbox import store as store_module
from mailyard.mailbox.outbox import OutboxIndex
from mailyard.mailbox.store import MailboxStore
from mailyard.org import Operator
from mailyard.passwords import hash_password
from tests.conftest import make_org

LOGON = ("sender", "sender-test-password")


@pytest.fixture
def app(redis_url: str, tmp_path: Path):
    org = make_org()
    org = org.model_copy(update={"operators": [
        *org.operators, Operator(name=LOGON[0], password=hash_password(LOGON[1]), rights=["SendAs"])]})
    directory = Directory(org)
    store = MailboxStore(tmp_path / "MBX-AMS-01", "MBX-AMS-01", lambda: org.transport)
    outbox, registered = OutboxIndex(), []
    application = api.create_app(
        server="MBX-AMS-01", site="Amsterdam", hosts=frozenset({"testserver"}), store=store,
        directory=lambda: directory, r=redisconn.connect(redis_url), outbox=outbox,
        on_submitted=lambda mailbox, items: registered.extend((mailbox, i) for i in items),
        on_acknowledged=lambda items: None, fault=lambda name: None)
    client = TestClient(application, raise_server_exceptions=True)
    client.auth = LOGON
    return client, store, outbox, registered


def fail_outbox_fsync_once(monkeypatch: pytest.MonkeyPatch) -> None:
    real, left = store_module._fsync_dir, [1]

    def failing(path: Path) -> None:
        if left[0] and "Outbox" in str(path):
            left[0] -= 1
            raise OSError(errno.EIO, "Input/output error")
        real(path)
    monkeypatch.setattr(store_module, "_fsync_dir", failing)


@pytest.mark.parametrize("batch", [False, True])
def test_the_retry_of_a_send_answered_503_registers_the_copy_it_finds(app, monkeypatch, batch: bool) -> None:
    client, store, outbox, registered = app
    messages = [{"to": ["carol@contoso.com"], "subject": f"s{n}", "message_id": f"<{n}.{batch}@c>"}
                for n in range(2 if batch else 1)]

    def send() -> list[dict]:
        if batch:
            response = client.post("/mailboxes/alice@contoso.com/outbox/batch", json={"messages": messages})
            assert response.status_code == 200, response.text
            return response.json()["results"]
        response = client.post("/mailboxes/alice@contoso.com/outbox", json=messages[0])
        return [{"status": response.status_code, **response.json()}]

    fail_outbox_fsync_once(monkeypatch)
    first = send()
    assert {r["status"] for r in first} == {503}, first
    assert registered == [] and outbox.items() == []  # answered 503: not sent (yet)

    again = send()
    assert [r["status"] for r in again] == [202] * len(messages), again
    on_disk = store.ids("alice@contoso.com", "Outbox")
    assert len(on_disk) == len(messages), f"stored once each: {on_disk}"
    assert sorted(outbox.items()) == sorted(("alice@contoso.com", i) for i in on_disk), \
        "the copies the retry found are not in the index the hubs take from"
    assert sorted(registered) == sorted(outbox.items())

    send()  # a third time: still once, and not registered again
    assert len(store.ids("alice@contoso.com", "Outbox")) == len(messages)
    assert len(registered) == len(messages)


def test_an_acknowledgement_redis_refuses_is_a_503_to_send_again_and_the_second_ends_it(
        redis_url: str, tmp_path: Path) -> None:
    import redis

    from mailyard import pki
    org = make_org()
    store = MailboxStore(tmp_path / "MBX-AMS-01", "MBX-AMS-01", lambda: org.transport)
    refusing, acknowledged = [True], []

    def on_acknowledged(items: list[tuple[str, str]]) -> None:
        if refusing[0]:
            raise redis.ResponseError("NOREPLICAS Not enough good replicas to write.")
        acknowledged.extend(items)
    application = api.create_app(
        server="MBX-AMS-01", site="Amsterdam", hosts=frozenset({"testserver"}), store=store,
        directory=lambda: Directory(org), r=redisconn.connect(redis_url), outbox=OutboxIndex(),
        on_submitted=lambda mailbox, items: None, on_acknowledged=on_acknowledged, fault=lambda name: None)

    async def as_a_hub(scope, receive, send):  # (what the TLS listener sets for a hub's certificate)
        scope.setdefault("state", {})[api.PEER] = pki.Identity("hub", pki.dns_label("Amsterdam"))
        await application(scope, receive, send)
    client = TestClient(as_a_hub, raise_server_exceptions=True)
    item, _ = store.submit("alice@contoso.com", "<ack@c>", b"Subject: s\r\nMessage-ID: <ack@c>\r\n\r\nhi\r\n")
    payload = {"items": [{"mailbox": "alice@contoso.com", "id": item}]}

    refused = client.post("/hub/outbox/submitted", json=payload)
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] == "5" and "NOREPLICAS" in refused.json()["error"], refused.json()
    assert store.ids("alice@contoso.com", "Sent Items") == [item]  # moved all the same

    refusing[0] = False
    again = client.post("/hub/outbox/submitted", json=payload)
    assert again.status_code == 200, again.text
    assert again.json()["results"] == [{"mailbox": "alice@contoso.com", "id": item, "state": "sent"}]
    assert acknowledged == [("alice@contoso.com", item)]
