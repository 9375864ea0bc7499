"""Logon on the mailbox API, as Exchange requires it: every client request authenticates as a
mailbox (HTTP Basic over TLS, with its password) or an operator; a mailbox acts on itself
only unless the organization grants FullAccess, SendAs or SendOnBehalf. Over real HTTPS to a
real mailbox server, with the organization's CA."""

from __future__ import annotations

import base64
import email
import json
from collections.abc import Iterator

import httpx
import pytest

from mailyard import registry
from mailyard.org import Operator
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from tests.conftest import ROOT, make_org

ALICE = ("alice@contoso.com", "alice-demo-password")
BOB = ("bob@contoso.com", "bob-demo-password")
DAVE = ("dave@contoso.com", "dave-demo-password")  # on the other server of the site
HELPDESK = ("helpdesk", "helpdesk-test-password")


def granted_org():
    """The demo organization, where bob grants alice FullAccess and SendOnBehalf, carol grants
    alice SendAs, and a help desk operator may read every mailbox (but send from none)."""
    org = make_org()
    boxes = []
    for mb in org.mailboxes:
        if mb.address == "bob@contoso.com":
            mb = mb.model_copy(update={"full_access": ["alice@contoso.com"], "send_on_behalf": ["alice@contoso.com"]})
        if mb.address == "carol@contoso.com":
            mb = mb.model_copy(update={"send_as": ["alice@contoso.com"]})
        boxes.append(mb)
    operators = [Operator(name=HELPDESK[0], password=HELPDESK[1], rights=["FullAccess"])]
    return org.model_copy(update={"mailboxes": boxes, "operators": operators})


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(redis_server.new_db(), tmp_path_factory.mktemp("logon"), granted_org(), cwd=ROOT)
    try:
        cluster.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
        yield cluster
    finally:
        cluster.close()


def url(site: Cluster, address: str, path: str) -> str:
    return f"{registry.server_url(site.r, site.server_of(address))}/mailboxes/{address}{path}"


def as_(site: Cluster, who: tuple[str, str] | None) -> httpx.Client:
    return site.client(auth=who)


def send(client: httpx.Client, site: Cluster, owner: str, raw: bytes,
         ctype: str = "message/rfc822") -> httpx.Response:
    return client.post(url(site, owner, "/outbox"), content=raw, headers={"Content-Type": ctype})


def error_of(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return str(response.json()["error"])


def outbox_count(site: Cluster, owner: str) -> int:
    return len(site.folder(owner, "Outbox")) + len(site.folder(owner, "Sent Items"))


CLIENT_ENDPOINTS = [
    ("GET", "/folders/Inbox"),
    ("GET", "/folders/Inbox/1.x.host"),
    ("POST", "/outbox"),
    ("POST", "/outbox/batch"),
]


@pytest.mark.parametrize(("method", "path"), CLIENT_ENDPOINTS)
def test_without_credentials_every_client_endpoint_is_401_with_a_basic_challenge(site, method, path) -> None:
    with as_(site, None) as anonymous:
        response = anonymous.request(method, url(site, "alice@contoso.com", path),
                                     content=b"To: bob@contoso.com\r\n\r\nx\r\n",
                                     headers={"Content-Type": "message/rfc822"})
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith('Basic realm="Mailyard MBX-AMS-01"')
    assert "log on" in error_of(response)


@pytest.mark.parametrize(("method", "path"), CLIENT_ENDPOINTS)
@pytest.mark.parametrize("who", [("alice@contoso.com", "wrong"), ("nobody@contoso.com", "x"), ("helpdesk", ""),
                                 ("operator", "guess"), ("", "")])
def test_a_wrong_password_or_unknown_user_is_401(site, method, path, who) -> None:
    with as_(site, who) as client:
        response = client.request(method, url(site, "alice@contoso.com", path), content=b"x",
                                  headers={"Content-Type": "message/rfc822"})
    assert response.status_code == 401, response.text
    assert "www-authenticate" in response.headers


def test_a_mailbox_reads_and_sends_as_itself(site) -> None:
    with as_(site, ALICE) as alice:
        assert alice.get(url(site, "alice@contoso.com", "/folders/Inbox")).status_code == 200
        sent = send(alice, site, "alice@contoso.com", b"To: dave@contoso.com\r\nSubject: mine\r\n\r\nx\r\n")
        assert sent.status_code == 202, sent.text
        # an alias is the mailbox too
        assert alice.get(url(site, "a.anders@contoso.com", "/folders/Inbox")).status_code == 200


@pytest.mark.parametrize("scheme", ["basic", "BASIC", "bAsIc"])
def test_the_basic_scheme_is_taken_in_any_case(site, scheme: str) -> None:
    """RFC 7235 2.1: the auth scheme is case-insensitive."""
    logon = {"Authorization": f"{scheme} " + base64.b64encode(":".join(ALICE).encode()).decode()}
    wrong = {"Authorization": f"{scheme} " + base64.b64encode(f"{ALICE[0]}:wrong".encode()).decode()}
    with as_(site, None) as client:
        assert client.get(url(site, "alice@contoso.com", "/folders/Inbox"), headers=logon).status_code == 200
        assert client.get(url(site, "alice@contoso.com", "/folders/Inbox"), headers=wrong).status_code == 401


def test_without_a_grant_another_mailbox_is_403_and_nothing_is_queued(site) -> None:
    before = outbox_count(site, "dave@contoso.com")
    with as_(site, ALICE) as alice:
        read = alice.get(url(site, "dave@contoso.com", "/folders/Inbox"))
        assert read.status_code == 403 and "may not read dave@contoso.com" in error_of(read)
        sent = send(alice, site, "dave@contoso.com", b"To: bob@contoso.com\r\n\r\nx\r\n")
        assert sent.status_code == 403 and "needs SendAs or SendOnBehalf" in error_of(sent)
        batch = alice.post(url(site, "dave@contoso.com", "/outbox/batch"),
                           json={"messages": [{"to": ["bob@contoso.com"], "subject": "not alice's"}]})
        assert batch.status_code == 403 and "needs SendAs or SendOnBehalf" in error_of(batch)
    with as_(site, DAVE) as dave:  # a right on bob is not one on alice
        assert dave.get(url(site, "bob@contoso.com", "/folders/Inbox")).status_code == 403
    assert outbox_count(site, "dave@contoso.com") == before


def test_full_access_reads_but_does_not_send_as(site) -> None:
    with as_(site, ALICE) as alice:
        listed = alice.get(url(site, "bob@contoso.com", "/folders/Inbox"))
        assert listed.status_code == 200 and listed.json()["mailbox"] == "bob@contoso.com"
    with as_(site, HELPDESK) as helpdesk:
        assert helpdesk.get(url(site, "carol@contoso.com", "/folders/Inbox")).status_code == 200
        refused = send(helpdesk, site, "carol@contoso.com", b"To: bob@contoso.com\r\n\r\nx\r\n")
        assert refused.status_code == 403, "FullAccess is no right to send"


def test_send_as_sends_from_the_other_mailbox_unmarked(site) -> None:
    with as_(site, ALICE) as alice:
        sent = send(alice, site, "carol@contoso.com",
                    b"From: carol@contoso.com\r\nTo: dave@contoso.com\r\nSubject: as carol\r\n\r\nx\r\n")
        assert sent.status_code == 202, sent.text
    item = next(i for i in site.folder("carol@contoso.com", "Outbox") + site.folder("carol@contoso.com", "Sent Items")
                if i["subject"] == "as carol")
    folder = "Outbox" if item in site.folder("carol@contoso.com", "Outbox") else "Sent Items"
    message = email.message_from_bytes(site.raw("carol@contoso.com", item["id"], folder))
    assert message["From"] == "carol@contoso.com" and message["Sender"] is None


def test_send_on_behalf_says_who_sent_it(site) -> None:
    with as_(site, ALICE) as alice:
        sent = send(alice, site, "bob@contoso.com", json.dumps(
            {"to": ["dave@contoso.com"], "subject": "for bob", "body": "x"}).encode(), "application/json")
        assert sent.status_code == 202, sent.text
        lying = send(alice, site, "bob@contoso.com",
                     b"From: bob@contoso.com\r\nSender: carol@contoso.com\r\nTo: dave@contoso.com\r\n\r\nx\r\n")
        assert lying.status_code == 403 and "Sender must be alice@contoso.com" in error_of(lying)
    items = site.folder("bob@contoso.com", "Outbox") + site.folder("bob@contoso.com", "Sent Items")
    item = next(i for i in items if i["subject"] == "for bob")
    folder = "Outbox" if any(i["id"] == item["id"] for i in site.folder("bob@contoso.com", "Outbox")) else "Sent Items"
    message = email.message_from_bytes(site.raw("bob@contoso.com", item["id"], folder))
    assert message["From"] == "bob@contoso.com" and message["Sender"] == "alice@contoso.com"


@pytest.mark.parametrize("raw", [
    b"From: alice@contoso.com\r\nFrom: ceo@contoso.com\r\nTo: bob@contoso.com\r\n\r\nx\r\n",
    b"From: alice@contoso.com, dave@contoso.com\r\nTo: bob@contoso.com\r\n\r\nx\r\n",
    b"From: \"Alice\" <carol@contoso.com>\r\nTo: bob@contoso.com\r\n\r\nx\r\n",
])
def test_every_from_address_must_be_the_mailboxs_own(site, raw) -> None:
    with as_(site, ALICE) as alice:
        response = send(alice, site, "alice@contoso.com", raw)
    assert response.status_code == 403, response.text


@pytest.mark.parametrize("raw", [
    b"From : carol@contoso.com\r\nTo: bob@contoso.com\r\n\r\nx\r\n",  # an "mbox From line" to Python
    b"To: bob@contoso.com\r\nnot a field\r\nFrom: carol@contoso.com\r\n\r\nx\r\n",  # ends Python's headers
    b" From: carol@contoso.com\r\nTo: bob@contoso.com\r\n\r\nx\r\n",  # folds nothing
])
def test_a_header_the_parser_would_skip_cannot_smuggle_another_from(site, raw) -> None:
    with as_(site, ALICE) as alice:
        response = send(alice, site, "alice@contoso.com", raw)
    assert response.status_code == 400 and "is not a header field" in error_of(response), response.text


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                   "application/octet-stream", ""])
def test_a_send_a_browser_could_forge_is_refused(site, ctype) -> None:
    before = outbox_count(site, "alice@contoso.com")
    with as_(site, ALICE) as alice:
        headers = {"Content-Type": ctype} if ctype else {}
        response = alice.post(url(site, "alice@contoso.com", "/outbox"),
                              content=b"To: bob@contoso.com\r\n\r\nforged\r\n", headers=headers)
    assert response.status_code == 415, response.text
    assert outbox_count(site, "alice@contoso.com") == before


@pytest.mark.parametrize("host", ["evil.example", "evil.example:443", "127.0.0.2", "mbx-ams-02.mailbox.mailyard.internal",
                                  "127.0.0.1:notaport", "[127.0.0.1]", "[mbx-ams-01.mailbox.mailyard.internal]",
                                  "127.0.0.1:1:2", "127.0.0.1.evil.example"])
def test_a_host_that_does_not_name_the_server_is_refused(site, host) -> None:
    with as_(site, ALICE) as alice:
        response = alice.get(url(site, "alice@contoso.com", "/folders/Inbox"), headers={"Host": host})
    assert response.status_code == 421, response.text
    assert "does not name this server" in error_of(response)


def test_the_api_is_tls_only_and_its_certificate_names_the_server(site) -> None:
    base = registry.server_url(site.r, "MBX-AMS-01")
    assert base.startswith("https://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(base.replace("https://", "http://") + "/health", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(base + "/health", timeout=10)  # the system's CAs do not know the organization's
    with site.client() as client, pytest.raises(httpx.ConnectError, match=r"[Hh]ostname mismatch"):
        client.get(base + "/health", extensions={"sni_hostname": "mbx-ams-02.mailbox.mailyard.internal"})
