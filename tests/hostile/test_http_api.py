"""The mailbox server's HTTP API under abuse, over real HTTPS: malformed JSON, wrong types, path
traversal (plain, encoded and double-encoded) in mailbox, folder and item names, huge
bodies, missing, garbled and wrong logons (HTTP Basic for the client API, a hub's client
certificate for the hub API; a Bearer token, the old server token, gets nothing), Host
headers that do not name the server, wrong methods, unknown routes, and a Hypothesis run
over random requests.

Requests are sent with http.client over a TLS socket made here (the organization's CA, the
server's identity as the TLS server name), so the path goes out exactly as given. Client
routes log on as alice (her own mailbox), hub routes present the certificate of a hub of
the server's site (Amsterdam), unless a test is about doing otherwise.

Every answer must be a 4xx with a JSON body ``{"error": "..."}`` (never a 500), no file may
appear outside the mailboxes' Maildirs, a body over the limit is refused with 413 without
the server reading (or keeping) more than the limit, and the server is healthy afterwards.

One exception, by design of the layers: requests that are not valid HTTP (a bad
Content-Length, an oversized header section) are refused by uvicorn before the application
sees them, with a plain-text 400, and what is not TLS (or TLS with a certificate of another
CA) fails the handshake; they are checked to be 4xx or refused, and harmless.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailyard import pki, registry
from mailyard.testing.cluster import Cluster
from tests.conftest import make_org
from tests.hostile.helpers import rss_kb, running_site

SERVER = "MBX-AMS-01"
SERVER_NAME = pki.Identity.mailbox(SERVER).dns_name  # the TLS server name, checked against its certificate
ORG = make_org()
TOKEN = "contoso-demo-token-change-me"  # the hub API's old shared secret (the demo's): it opens nothing now
ALICE = ("alice@contoso.com", "alice-demo-password")  # deploy/contoso.toml
HUB = pki.Identity.hub("Amsterdam")  # the server's site: the only certificate the hub API takes
OTHER_SITE_HUB = pki.Identity.hub("London")
MAILBOX_SERVERS = [pki.Identity.mailbox(s) for s in ("MBX-AMS-01", "MBX-AMS-02", "MBX-LON-01")]
CONTEXTS: dict[pki.Identity | None, ssl.SSLContext] = {}  # None: no client certificate
CANARY = b"canary: this file is outside every mailbox"
LIMIT = ORG.transport.max_message_size
BEFORE: set[Path] = set()  # the data directory's files when the server had started
RANDOM_REQUESTS = 300


@pytest.fixture(scope="module")
def api(redis_server, tmp_path_factory):
    data = tmp_path_factory.mktemp("http")
    with running_site(redis_server, data, ORG, mailboxes=[SERVER], hub=None) as cluster:
        # files a traversal would reach: beside the mailboxes, beside the server's store, and
        # in the data directory itself
        for path in (data / "secret.txt", data / "mailboxes" / "secret.txt", data / "mailboxes" / SERVER / "secret.txt"):
            path.write_bytes(CANARY)
        BEFORE.update(files(data))
        CONTEXTS[None] = pki.trust_context(cluster.pki.cert_path)
        for identity in (HUB, OTHER_SITE_HUB, *MAILBOX_SERVERS):
            CONTEXTS[identity] = pki.NodeCert(cluster.pki.dir, identity).client_context()
        yield cluster


@pytest.fixture(scope="module")
def address(api: Cluster) -> tuple[str, int]:
    url = registry.server_url(api.r, SERVER)
    assert url.startswith("https://"), url
    host, _, port = url.removeprefix("https://").partition(":")
    return host, int(port)


def files(root: Path) -> set[Path]:
    return {Path(d) / f for d, _, names in os.walk(root) for f in names}


def tls(address: tuple[str, int], cert: pki.Identity | None = None,
        context: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    """A TLS connection to the server, verified as the server's identity; presenting the
    certificate of ``cert`` (None: no client certificate), or made with ``context``."""
    ctx = context or CONTEXTS[cert]
    return ctx.wrap_socket(socket.create_connection(address, timeout=30), server_hostname=SERVER_NAME)


def host_of(address: tuple[str, int]) -> str:
    """The Host header http.client sends (one the server takes as its own name)."""
    return f"{address[0]}:{address[1]}"


def request(address: tuple[str, int], method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, cert: pki.Identity | None = None,
            ) -> tuple[int, dict[str, str], bytes]:
    """One request over TLS, sent exactly as given (the path is not normalised or re-encoded);
    ``cert``: the node whose client certificate is presented (a hub: the hub API)."""
    headers = headers or {}
    conn = http.client.HTTPConnection(*address, timeout=30)
    conn.sock = tls(address, cert)
    try:
        conn.putrequest(method, path, skip_host=any(k.lower() == "host" for k in headers),
                        skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def error_of(status: int, headers: dict[str, str], body: bytes, method: str = "GET") -> str:
    """The error text of a refusal; fails unless it is a 4xx with a JSON {"error": "..."}."""
    assert 400 <= status < 500, f"expected a 4xx, got {status}: {body[:300]!r}"
    if method == "HEAD":
        return ""
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:300])
    data = json.loads(body)
    assert isinstance(data, dict) and isinstance(data.get("error"), str) and data["error"], data
    return data["error"]


def basic(login: str | bytes, password: str | bytes = b"") -> dict[str, str]:
    """An Authorization header of HTTP Basic credentials (bytes: as they are, not UTF-8)."""
    raw = (login if isinstance(login, bytes) else login.encode()) + b":" \
        + (password if isinstance(password, bytes) else password.encode())
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


AS_ALICE = basic(*ALICE)
JSON = {"Content-Type": "application/json"}
OUTBOX = "/mailboxes/alice@contoso.com/outbox"


def logged_on(path: str) -> tuple[dict[str, str], pki.Identity | None]:
    """The logon a route takes (headers, client certificate): a hub's certificate for the hub
    API, alice's Basic credentials for the rest."""
    return ({}, HUB) if path.startswith("/hub") else (AS_ALICE, None)


def outbox_count(api: Cluster) -> int:
    return len(api.folder("alice@contoso.com", "Outbox"))


# region: malformed JSON and wrong types


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "body is not JSON"),
        (b"{", "body is not JSON"),
        (b"[" * 100_000, "body is not JSON"),  # nested too deeply for the parser
        (b'{"to": ["bob@contoso.com"]' + b"}" * 3, "body is not JSON"),
        (b"\xff\xfe\x00{", "body is not JSON"),
        (b"NaN", "expected a JSON object"),
        (b"null", "expected a JSON object"),
        (b'"bob@contoso.com"', "expected a JSON object"),
        (b"[]", "expected a JSON object"),
        (b'{"to": 1}', "to: expected a list of addresses"),
        (b'{"to": [1]}', "to: expected a list of addresses"),
        (b'{"to": {"bob@contoso.com": 1}}', "to: expected a list of addresses"),
        (b'{"cc": [null]}', "cc: expected a list of addresses"),
        (b'{"to": ["bob@contoso.com"], "subject": 5}', "subject and body must be strings"),
        (b'{"to": ["bob@contoso.com"], "body": ["x"]}', "subject and body must be strings"),
        (b'{"to": ["bob@contoso.com"], "message_id": 7}', "message_id"),
        (b'{"to": ["bob@contoso.com"], "From": "bob@contoso.com"}', "unknown field(s): From"),
        (b'{"to": ["not an address"]}', "is not a valid e-mail address"),
        (b'{"to": ["bob@contoso.com\\u0000"]}', "is not a valid e-mail address"),
        (b'{"to": []}', "no recipients"),
        # header injection and what the email package refuses to encode
        (b'{"to": ["bob@contoso.com"], "subject": "hi\\r\\nBcc: eve@example.org"}', "cannot be built"),
        (b'{"to": ["bob@contoso.com\\r\\nBcc: eve@example.org"]}', "cannot be built"),
        (b'{"to": ["bob@contoso.com"], "subject": "\\ud800"}', "cannot be built"),
        (b'{"to": ["bob@contoso.com"], "body": "lone \\udfff surrogate"}', "cannot be built"),
    ],
)
def test_bad_json_submissions_are_400_naming_the_problem(api, address, body: bytes, needle: str) -> None:
    before = outbox_count(api)
    status, headers, answer = request(address, "POST", OUTBOX, body, {**JSON, **AS_ALICE})
    assert needle in error_of(status, headers, answer), answer
    assert outbox_count(api) == before, "a refused submission reached the Outbox"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"[" * 100_000, "body is not JSON"),
        (b"{}", "messages: expected a non-empty list"),
        (b'{"messages": "m1"}', "messages: expected a non-empty list"),
        (b'{"messages": [null]}', "messages[0]: expected an object"),
        (b'{"messages": [{"id": 1, "recipients": ["alice@contoso.com"], "raw": ""}]}', "messages[0].id"),
        (b'{"messages": [{"id": "../../x", "recipients": ["alice@contoso.com"], "raw": ""}]}', "messages[0].id"),
        (b'{"messages": [{"id": "a/b", "recipients": ["alice@contoso.com"], "raw": ""}]}', "messages[0].id"),
        # digits and letters, but not ASCII ones: the store would refuse them as a file name
        ('{"messages": [{"id": "\u0661\u0662", "recipients": ["alice@contoso.com"], "raw": ""}]}'.encode(),
         "messages[0].id"),
        (b'{"messages": [{"id": "' + b"x" * 65 + b'", "recipients": ["alice@contoso.com"], "raw": ""}]}',
         "messages[0].id"),
        (b'{"messages": [{"id": "m1", "recipients": "alice@contoso.com", "raw": ""}]}', "messages[0].recipients"),
        (b'{"messages": [{"id": "m1", "recipients": [7], "raw": ""}]}', "messages[0].recipients"),
        (b'{"messages": [{"id": "m1", "recipients": ["alice@contoso.com"], "raw": 5}]}', "messages[0].raw"),
        (b'{"messages": [{"id": "m1", "recipients": ["alice@contoso.com"], "raw": "***"}]}', "not valid base64"),
    ],
)
def test_bad_deliveries_are_400_naming_the_field(api, address, body: bytes, needle: str) -> None:
    status, headers, answer = request(address, "POST", "/hub/deliver", body, JSON, HUB)
    assert needle in error_of(status, headers, answer), answer


def test_a_delivery_to_addresses_that_are_not_mailboxes_here_is_refused_per_recipient(api, address) -> None:
    raw = base64.b64encode(b"Subject: tricks\r\n\r\nx\r\n").decode()
    tricks = ["../../secret.txt", "../bob@contoso.com", "alice@contoso.com/../../x", "alice@contoso.com\u0000",
              ".alice@contoso.com", "carol@contoso.com", "ali\u0307ce@contoso.com", "alice@contoso.com "]
    body = json.dumps({"messages": [{"id": "tricks1", "recipients": tricks, "raw": raw}]}).encode()
    status, _, answer = request(address, "POST", "/hub/deliver", body, JSON, HUB)
    assert status == 200, answer
    results = json.loads(answer)["results"]
    assert [r["code"] for r in results] == [550] * len(tricks), results
    assert all(r["status"] == "5.1.1" for r in results)


# endregion

# region: path traversal


TRAVERSALS = [
    # in the mailbox name
    "/mailboxes/..%2F..%2Fsecret.txt/folders/Inbox",
    "/mailboxes/%2E%2E/folders/Inbox",
    "/mailboxes/..%252F..%252Fsecret.txt/folders/Inbox",
    "/mailboxes/%252E%252E/folders/Inbox",
    "/mailboxes/alice@contoso.com%2F..%2Fbob@contoso.com/folders/Inbox",
    "/mailboxes/%2Falice@contoso.com/folders/Inbox",
    "/mailboxes/alice@contoso.com%00/folders/Inbox",
    "/mailboxes/.alice@contoso.com/folders/Inbox",
    "/mailboxes/alice@contoso.com%5C..%5C..%5Csecret.txt/folders/Inbox",
    "/mailboxes/../secret.txt",
    # in the folder name
    "/mailboxes/alice@contoso.com/folders/..",
    "/mailboxes/alice@contoso.com/folders/%2E%2E",
    "/mailboxes/alice@contoso.com/folders/..%2F..%2F..%2Fsecret.txt",
    "/mailboxes/alice@contoso.com/folders/%252E%252E%252Fsecret.txt",
    "/mailboxes/alice@contoso.com/folders/.Outbox",
    "/mailboxes/alice@contoso.com/folders/Inbox%00",
    "/mailboxes/alice@contoso.com/folders/mailyard-delivered",
    "/mailboxes/alice@contoso.com/folders/%2Fetc%2Fpasswd",
    # in the item name
    "/mailboxes/alice@contoso.com/folders/Inbox/..%2F..%2F..%2F..%2Fsecret.txt",
    "/mailboxes/alice@contoso.com/folders/Inbox/%2E%2E%2F%2E%2E%2Fsecret.txt",
    "/mailboxes/alice@contoso.com/folders/Inbox/..%252F..%252F..%252Fsecret.txt",
    "/mailboxes/alice@contoso.com/folders/Inbox/%2Fetc%2Fpasswd",
    "/mailboxes/alice@contoso.com/folders/Inbox/..",
    "/mailboxes/alice@contoso.com/folders/Inbox/.",
    "/mailboxes/alice@contoso.com/folders/Inbox/new",
    "/mailboxes/alice@contoso.com/folders/Inbox/tmp",
    "/mailboxes/alice@contoso.com/folders/Inbox/x%00.txt",
    "/mailboxes/alice@contoso.com/folders/Inbox/" + "a" * 300,
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_is_a_404_and_reads_nothing_outside_the_store(api, address, path: str) -> None:
    headers, cert = logged_on(path)
    status, headers, answer = request(address, "GET", path, headers=headers, cert=cert)
    error_of(status, headers, answer)
    assert status == 404, (status, answer)
    assert CANARY not in answer and b"root:" not in answer


@pytest.mark.parametrize(("mailbox", "item"), [
    ("alice@contoso.com", "../../secret.txt"),
    ("alice@contoso.com", "..%2F..%2Fsecret.txt"),
    ("alice@contoso.com", "/etc/passwd"),
    ("alice@contoso.com", "new"),
    ("alice@contoso.com", "mailyard-submitted"),
    ("alice@contoso.com", ".."),
])
def test_a_hubs_acknowledgement_of_a_path_moves_nothing(api, address, mailbox: str, item: str) -> None:
    body = json.dumps({"items": [{"mailbox": mailbox, "id": item}]}).encode()
    status, headers, answer = request(address, "POST", "/hub/outbox/submitted", body, JSON, HUB)
    assert status == 200, (status, answer)
    assert json.loads(answer)["results"] == [{"mailbox": mailbox, "id": item, "state": "gone"}]
    for canary in (api.data_dir / "secret.txt", api.data_dir / "mailboxes" / SERVER / "secret.txt"):
        assert canary.read_bytes() == CANARY, f"{canary} was moved"


@pytest.mark.parametrize("mailbox", ["../../secret.txt", "..", "alice@contoso.com/../bob@contoso.com", "x\x00"])
def test_a_hubs_acknowledgement_for_a_mailbox_path_is_a_404(api, address, mailbox: str) -> None:
    body = json.dumps({"items": [{"mailbox": mailbox, "id": "1.M1P1Q1.host"}]}).encode()
    status, headers, answer = request(address, "POST", "/hub/outbox/submitted", body, JSON, HUB)
    error_of(status, headers, answer)
    assert status == 404, (status, answer)


@pytest.mark.parametrize("path", [
    "/mailboxes/..%2F..%2Fsecret.txt/outbox",
    "/mailboxes/alice@contoso.com%2F..%2F..%2Fx/outbox",
])
def test_writes_through_traversal_paths_are_refused(api, address, path: str) -> None:
    raw = b"To: bob@contoso.com\r\nSubject: traversal\r\n\r\nx\r\n"
    logon, cert = logged_on(path)
    status, headers, answer = request(address, "POST", path, raw, {"Content-Type": "message/rfc822", **logon}, cert)
    error_of(status, headers, answer)
    assert status == 404, (status, answer)


# endregion

# region: huge bodies


def raw_head(address: tuple[str, int], method: str, path: str, headers: dict[str, str]) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host_of(address)}\r\n"
    return (head + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()


@pytest.mark.parametrize(("path", "headers", "cert"), [
    (OUTBOX, {"Content-Type": "message/rfc822", **AS_ALICE}, None),
    ("/hub/deliver", JSON, HUB),
])
def test_a_declared_body_over_the_limit_is_413_before_it_is_read(api, address, path, headers, cert) -> None:
    with tls(address, cert) as s:
        s.sendall(raw_head(address, "POST", path, {"Content-Length": str(10 ** 12), **headers}) + b"x" * 1000)
        answer = read_response(s)  # (with no more body: the answer must not wait for the rest)
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 413 " in status_line, answer[:300]
    assert b"larger than the limit" in rest


@pytest.mark.parametrize(("path", "headers", "cert", "status"), [
    pytest.param(OUTBOX, {"Content-Type": "message/rfc822"}, None, 401, id="send, no logon"),
    pytest.param(OUTBOX, {"Content-Type": "message/rfc822", **basic(ALICE[0], "wrong")}, None, 401,
                 id="send, wrong password"),
    pytest.param(OUTBOX, {"Content-Type": "message/rfc822", **bearer()}, HUB, 401, id="send, a hub and a token"),
    pytest.param("/hub/deliver", {**JSON, **bearer()}, None, 401, id="deliver, a token, no certificate"),
    pytest.param("/hub/deliver", JSON, OTHER_SITE_HUB, 403, id="deliver, another site's hub"),
])
def test_a_declared_body_without_a_valid_logon_is_refused_before_it_is_read(api, address, path, headers, cert,
                                                                              status) -> None:
    with tls(address, cert) as s:
        s.sendall(raw_head(address, "POST", path, {"Content-Length": str(10 ** 12), **headers}) + b"x" * 1000)
        answer = read_response(s)
    assert f" {status} ".encode() in answer.partition(b"\r\n")[0], answer[:300]


def chunked_upload(address: tuple[str, int], path: str, headers: dict[str, str], total: int,
                   cert: pki.Identity | None = None) -> tuple[bytes, int]:
    """Stream ``total`` bytes with chunked encoding (no Content-Length); return the answer and how
    much the server let us send before it answered and stopped reading."""
    sent = 0
    chunk = b"x" * 65536
    with tls(address, cert) as s:
        s.sendall(raw_head(address, "POST", path, {"Transfer-Encoding": "chunked", **headers}))
        try:
            while sent < total:
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
            s.sendall(b"0\r\n\r\n")
        except OSError:  # (a reset, a broken pipe, the TLS layer's end, a timeout)
            pass  # the server answered and stopped reading: what we hoped for
        answer = read_response(s)
    return answer, sent


def read_response(s: socket.socket) -> bytes:
    """One HTTP response (status line, headers, a Content-Length body), or what came before EOF."""
    f = s.makefile("rb")
    out, length = b"", 0
    try:
        while (line := f.readline()) not in (b"\r\n", b""):
            out += line
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return out and out + b"\r\n" + f.read(length)
    except OSError:  # (a reset, TLS ended without close_notify, a timeout)
        return out


# A body streamed (chunked, no Content-Length) that the server refuses: over the limit (413),
# or without a valid logon (401, 403), which it refuses without reading the body at all.
REFUSED_STREAMS = [
    pytest.param(OUTBOX, {"Content-Type": "message/rfc822", **AS_ALICE}, None, 413, id="send, over the limit"),
    pytest.param(OUTBOX, {"Content-Type": "message/rfc822"}, None, 401, id="send, no logon"),
    pytest.param("/hub/deliver", {**JSON, **bearer()}, None, 401, id="hub, a token, no certificate"),
    pytest.param("/hub/deliver", JSON, MAILBOX_SERVERS[1], 403, id="hub, a mailbox server's certificate"),
]


@pytest.mark.parametrize(("path", "headers", "cert", "status"), REFUSED_STREAMS)
def test_a_refused_streamed_body_is_answered_and_not_buffered(api, address, path, headers, cert, status) -> None:
    pid = api.procs[SERVER].pid
    before = rss_kb(pid)
    answer, sent = chunked_upload(address, path, headers, 6 * LIMIT, cert)
    after = rss_kb(pid)
    print(f"\nstreamed {sent / 2**20:.1f} MB of a {6 * LIMIT / 2**20:.0f} MB body before the server stopped "
          f"reading; mailbox server RSS {before / 1024:.1f} -> {after / 1024:.1f} MB")
    assert after - before < 3 * LIMIT // 1024, "the server buffered far more than the limit"
    if answer:  # (the reset may beat the answer to the client; the server must still be fine)
        assert f" {status} ".encode() in answer.partition(b"\r\n")[0], answer[:300]
        if status == 413:
            assert b"larger than the limit" in answer
    assert api.http.get(registry.server_url(api.r, SERVER) + "/health").status_code == 200


@pytest.mark.parametrize(("path", "headers", "cert", "status"), REFUSED_STREAMS)
def test_the_server_stops_reading_a_refused_streamed_body(api, address, path, headers, cert, status) -> None:
    answer, sent = chunked_upload(address, path, headers, 6 * LIMIT, cert)
    assert sent < 3 * LIMIT, f"the server read {sent / 2**20:.0f} MB after refusing the request with {status}"


@pytest.mark.parametrize("head", [
    b"POST /mailboxes/alice@contoso.com/outbox HTTP/1.1\r\nHost: {host}\r\nContent-Length: -5\r\n\r\n",
    b"POST /mailboxes/alice@contoso.com/outbox HTTP/1.1\r\nHost: {host}\r\nContent-Length: 12abc\r\n\r\n",
    b"POST /mailboxes/alice@contoso.com/outbox HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n"
    b"Content-Length: 6\r\n\r\n",
    pytest.param(b"GET /health HTTP/1.1\r\nHost: {host}\r\nX-Big: " + b"a" * 2_000_000 + b"\r\n\r\n",
                 id="a 2 MB header"),
    pytest.param(b"GET /health HTTP/1.1\r\nHost: {host}\r\n"
                 + b"".join(b"X-H%d: v\r\n" % i for i in range(50_000)) + b"\r\n", id="50000 headers"),
    b"BREW /health HTCPCP/1.0\r\n\r\n",
    b"GET /health HTTP/1.1\r\n\r\n",  # no Host at all
    b"GET /health HTTP/1.1\r\nHost: {host}\r\nHost: evil.example\r\n\r\n",
])
def test_invalid_http_is_refused_by_the_server_layer(api, address, head: bytes) -> None:
    with tls(address, HUB) as s:
        try:
            s.sendall(head.replace(b"{host}", host_of(address).encode()))
            answer = read_response(s)
        except OSError:
            answer = b""
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, answer[:300]
    assert api.http.get(registry.server_url(api.r, SERVER) + "/health").status_code == 200


@pytest.mark.parametrize("data", [
    pytest.param(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", id="plain HTTP"),
    pytest.param(b"POST /hub/deliver HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", id="plain HTTP with the token"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100, id="a broken ClientHello"),
    pytest.param(b"\x16\x03\x00\x00\x05\x01\x00\x00\x01\x00", id="an SSL 3.0 record"),
    pytest.param(b"\x00" * 5000, id="zeros"),
])
def test_what_is_not_tls_never_reaches_the_application(api, address, data: bytes) -> None:
    with socket.create_connection(address, timeout=30) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # all there is: a record cut short must not wait for its rest
            answer = read_response(s)
        except OSError:
            answer = b""
    if answer.startswith(b"HTTP/"):  # (uvicorn sends none; a plain-text refusal would be fine)
        assert 400 <= int(answer.split(b" ", 2)[1]) < 500, answer[:300]
    assert b'"results"' not in answer and b'"error"' not in answer, answer[:300]
    assert api.http.get(registry.server_url(api.r, SERVER) + "/health").status_code == 200


# endregion

# region: logon, certificates, Host, methods, routes

CLIENT_ROUTES = [
    ("GET", "/mailboxes/alice@contoso.com/folders/Inbox"),
    ("GET", "/mailboxes/alice@contoso.com/folders/Inbox/1.x.host"),
    ("POST", OUTBOX),
]
HUB_ROUTES = [
    ("POST", "/hub/outbox/take"),
    ("POST", "/hub/outbox/submitted"),
    ("POST", "/hub/deliver"),
]


def body_for(method: str, path: str) -> tuple[bytes | None, dict[str, str]]:
    """What a route takes (so a refusal is about the logon, not the body); a delivery that
    would store an item with id ``tok1`` in alice's Inbox, a send with subject ``tok1``."""
    if method != "POST":
        return None, {}
    if path == "/hub/deliver":
        raw = base64.b64encode(b"Subject: tok1\r\n\r\nx\r\n").decode()
        return json.dumps({"messages": [{"id": "tok1", "recipients": ["alice@contoso.com"], "raw": raw}]}).encode(), JSON
    if path == "/hub/outbox/take":
        return json.dumps({"limit": 10}).encode(), JSON
    if path == "/hub/outbox/submitted":
        return json.dumps({"items": [{"mailbox": "alice@contoso.com", "id": "1.M1P1Q1.host"}]}).encode(), JSON
    return json.dumps({"to": ["bob@contoso.com"], "subject": "tok1"}).encode(), JSON


def nothing_got_through(api: Cluster) -> None:
    inbox = api.folder("alice@contoso.com")
    assert not any(".Ytok1." in i["id"] or i["subject"] == "tok1" for i in inbox), "delivered without a logon"
    sent = api.folder("alice@contoso.com", "Outbox") + api.folder("alice@contoso.com", "Sent Items")
    assert not any(i["subject"] == "tok1" for i in sent), "sent without a logon"


@pytest.mark.parametrize("authorization", [
    pytest.param({}, id="none"),
    pytest.param({"Authorization": ""}, id="empty"),
    pytest.param({"Authorization": "Basic"}, id="Basic alone"),
    # (h11 strips trailing white space from header values, as RFC 9110 says: "Basic " is no credential)
    pytest.param({"Authorization": "Basic "}, id="Basic and a space"),
    pytest.param({"Authorization": "Basic !!!not-base64!!!"}, id="not base64"),
    pytest.param({"Authorization": "Basic " + base64.b64encode(b"alice@contoso.com").decode()}, id="no colon"),
    pytest.param({"Authorization": "Basic " + base64.b64encode(b"alice@contoso.com:alice-demo-password").decode()
                  + "==="}, id="base64 with extra padding"),
    pytest.param({"Authorization": "Basic \xe9\xff"}, id="latin-1 garbage"),
    pytest.param(basic(b"alice@contoso.com", b"alice-demo-\xe9password"), id="not UTF-8"),
    pytest.param(basic(ALICE[0], "wrong"), id="wrong password"),
    pytest.param(basic(ALICE[0], ALICE[1] + "x"), id="password and more"),
    pytest.param(basic(ALICE[0], ALICE[1][:-1]), id="password but its last character"),
    pytest.param(basic(ALICE[0], ALICE[1].upper()), id="password in capitals"),
    pytest.param(basic(ALICE[0], ""), id="no password"),
    pytest.param(basic("", ALICE[1]), id="no login"),
    pytest.param(basic("nobody@contoso.com", ALICE[1]), id="unknown mailbox"),
    pytest.param(basic("bob@contoso.com", ALICE[1]), id="another mailbox's login"),
    pytest.param(basic("operator", ""), id="the site operator, no password"),
    pytest.param(basic("operator", "operator"), id="the site operator, a guess"),
    pytest.param(basic("cluster-operator", "x"), id="the test operator, a guess"),
    pytest.param(basic("../../alice@contoso.com", ALICE[1]), id="a traversal as the login"),
    pytest.param(basic("alice@contoso.com\x00", ALICE[1]), id="a NUL in the login"),
    pytest.param(basic(ALICE[0], "x" * 40_000), id="a 40 KB password"),
    pytest.param({"Authorization": f"Digest username=\"{ALICE[0]}\", response=\"x\""}, id="Digest"),
    pytest.param(bearer(), id="the server token"),
    pytest.param(bearer(ALICE[1]), id="alice's password as a Bearer token"),
    pytest.param({"Authorization": "Bearer " + AS_ALICE["Authorization"].split()[1]}, id="Basic credentials as Bearer"),
    pytest.param({"X-Server-Token": TOKEN}, id="X-Server-Token"),
    pytest.param({"Cookie": f"session={TOKEN}"}, id="a cookie"),
])
@pytest.mark.parametrize(("method", "path"), CLIENT_ROUTES)
def test_the_client_api_without_a_valid_basic_logon_is_401_with_a_challenge(api, address, method, path,
                                                                            authorization) -> None:
    body, ctype = body_for(method, path)
    status, headers, answer = request(address, method, path, body, {**ctype, **authorization})
    error = error_of(status, headers, answer)
    assert status == 401, (status, answer)
    assert headers.get("www-authenticate", "").startswith('Basic realm="Mailyard MBX-AMS-01"'), headers
    assert "log on" in error or "Basic" in error or "logon failed" in error, error
    nothing_got_through(api)


@pytest.mark.parametrize("cert", [HUB, OTHER_SITE_HUB, *MAILBOX_SERVERS], ids=str)
@pytest.mark.parametrize(("method", "path"), CLIENT_ROUTES)
def test_a_node_certificate_is_no_logon_on_the_client_api(api, address, method, path, cert) -> None:
    body, ctype = body_for(method, path)
    status, headers, answer = request(address, method, path, body, {**ctype, **bearer()}, cert)
    error_of(status, headers, answer)
    assert status == 401 and "www-authenticate" in headers, (status, answer)
    nothing_got_through(api)


@pytest.mark.parametrize(("method", "path", "body", "needle"), [
    ("GET", "/mailboxes/bob@contoso.com/folders/Inbox", None, "may not read bob@contoso.com"),
    ("GET", "/mailboxes/bob@contoso.com/folders/Inbox/1.x.host", None, "may not read bob@contoso.com"),
    ("POST", "/mailboxes/bob@contoso.com/outbox", b"To: dave@contoso.com\r\nSubject: tok1\r\n\r\nx\r\n",
     "needs SendAs or SendOnBehalf"),
    ("POST", OUTBOX, b"From: bob@contoso.com\r\nTo: dave@contoso.com\r\nSubject: tok1\r\n\r\nx\r\n",
     "may not send as bob@contoso.com"),
    ("POST", OUTBOX, b"From: alice@contoso.com\r\nFrom: ceo@contoso.com\r\nTo: dave@contoso.com\r\n"
                     b"Subject: tok1\r\n\r\nx\r\n", "may not send as ceo@contoso.com"),
    ("POST", OUTBOX, b"From: alice@contoso.com, <>\r\nTo: dave@contoso.com\r\nSubject: tok1\r\n\r\nx\r\n",
     "may not send as"),
    ("POST", OUTBOX, b"From: alice@contoso.com\r\nSender: bob@contoso.com\r\nTo: dave@contoso.com\r\n"
                     b"Subject: tok1\r\n\r\nx\r\n", "Sender bob@contoso.com"),
])
def test_logged_on_as_alice_other_mailboxes_and_addresses_are_403(api, address, method, path, body, needle) -> None:
    headers = {**AS_ALICE, "Content-Type": "message/rfc822"} if body else AS_ALICE
    status, answer_headers, answer = request(address, method, path, body, headers)
    assert needle in error_of(status, answer_headers, answer) and status == 403, (status, answer)
    for owner in ("alice@contoso.com", "bob@contoso.com"):
        sent = api.folder(owner, "Outbox") + api.folder(owner, "Sent Items")
        assert not any(i["subject"] == "tok1" for i in sent), "a refused send was queued"


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                   "application/octet-stream", "application/jsonx", "message/rfc822x", "", None])
@pytest.mark.parametrize("path", [OUTBOX, "/hub/deliver"])
def test_a_body_of_another_type_is_415(api, address, path, ctype) -> None:
    body, _ = body_for("POST", path)
    logon, cert = logged_on(path)
    headers = {**logon, **({"Content-Type": ctype} if ctype is not None else {})}
    status, answer_headers, answer = request(address, "POST", path, body, headers, cert)
    error_of(status, answer_headers, answer)
    assert status == 415, (status, answer)
    nothing_got_through(api)


@pytest.mark.parametrize("authorization", [
    pytest.param({}, id="nothing"),
    pytest.param(bearer(), id="the server token"),
    pytest.param({"Authorization": f"bearer {TOKEN}"}, id="the server token, lower case"),
    pytest.param({"Authorization": f"Bearer  {TOKEN}"}, id="the server token, two spaces"),
    pytest.param(bearer("wrong"), id="a wrong token"),
    pytest.param(bearer("\xe9\xff"), id="a latin-1 token"),
    pytest.param({"Authorization": f"Basic {base64.b64encode(TOKEN.encode()).decode()}"}, id="the token as Basic"),
    pytest.param(basic(*ALICE), id="alice's logon"),
    pytest.param({"X-Server-Token": TOKEN}, id="X-Server-Token"),
    pytest.param({"X-Mailyard-Hub": "rx-1", "X-Client-Cert": "hub-amsterdam"}, id="claims in headers"),
])
@pytest.mark.parametrize(("method", "path"), HUB_ROUTES)
def test_the_hub_api_without_a_client_certificate_is_401_whatever_the_headers(api, address, method, path,
                                                                             authorization) -> None:
    body, ctype = body_for(method, path)
    status, headers, answer = request(address, method, path, body, {**ctype, **authorization})
    error = error_of(status, headers, answer)
    assert status == 401 and "client certificate of a hub of site Amsterdam" in error, (status, answer)
    nothing_got_through(api)


def test_the_cluster_operator_logs_on_to_the_client_api_but_not_the_hub_api(api, address) -> None:
    operator = basic(*api.operator)
    status, _, answer = request(address, "GET", "/mailboxes/alice@contoso.com/folders/Inbox", headers=operator)
    assert status == 200, answer
    for method, path in HUB_ROUTES:
        body, ctype = body_for(method, path)
        status, headers, answer = request(address, method, path, body, {**ctype, **operator})
        error_of(status, headers, answer)
        assert status == 401, (status, answer)
    nothing_got_through(api)


@pytest.mark.parametrize("cert", [OTHER_SITE_HUB, *MAILBOX_SERVERS], ids=str)
@pytest.mark.parametrize(("method", "path"), HUB_ROUTES)
def test_the_hub_api_with_another_nodes_certificate_is_403(api, address, method, path, cert) -> None:
    body, ctype = body_for(method, path)
    status, headers, answer = request(address, method, path, body, {**ctype, **bearer()}, cert)
    error = error_of(status, headers, answer)
    assert status == 403 and "only hubs of site Amsterdam" in error, (status, answer)
    nothing_got_through(api)


def test_a_hub_certificate_of_another_ca_fails_the_handshake(api, address, tmp_path) -> None:
    """A certificate for the right name, made by a CA that is not the organization's."""
    evil = pki.CA(tmp_path / "evil")
    evil.init("Contoso")
    forged = evil.issue(HUB)
    ctx = pki.trust_context(api.pki.cert_path)  # (the client trusts the real server)
    ctx.load_cert_chain(forged.cert_path, forged.key_path)
    body, _ = body_for("POST", "/hub/deliver")
    answer = b""
    try:
        with tls(address, context=ctx) as s:  # (TLS 1.3: the server's alert comes with the first read)
            s.sendall(raw_head(address, "POST", "/hub/deliver", {"Content-Length": str(len(body)), **JSON}) + body)
            answer = read_response(s)
    except OSError:  # (an SSLError, a reset, a broken pipe: refused)
        pass
    assert not answer, f"answered a forged certificate: {answer[:300]!r}"
    nothing_got_through(api)


def test_a_hub_of_the_site_may_use_the_hub_api(api, address) -> None:
    """(The positive control of the refusals above: the same requests with the right certificate.)"""
    status, headers, answer = request(address, "POST", "/hub/outbox/take", b"{}", JSON, cert=HUB)
    error_of(status, headers, answer)
    assert status == 400, answer  # (past the certificate check: the request lacks its limit)
    raw = base64.b64encode(b"Subject: hub ok\r\n\r\nx\r\n").decode()
    body = json.dumps({"messages": [{"id": "hubok1", "recipients": ["alice@contoso.com"], "raw": raw}]}).encode()
    status, _, answer = request(address, "POST", "/hub/deliver", body, {**JSON, **bearer("anything")}, HUB)
    assert status == 200 and json.loads(answer)["results"][0]["code"] == 250, answer
    assert "hub ok" in api.subjects("alice@contoso.com")


@pytest.mark.parametrize("host", [
    "evil.example", "evil.example:443", "127.0.0.2", "localhost", "0.0.0.0", "127.0.0.1.evil.example",
    "mbx-ams-02.mailbox.mailyard.internal", "amsterdam.hub.mailyard.internal", f"{SERVER_NAME}.evil.example",
    f"evil.example:{SERVER_NAME}", f"{SERVER_NAME}.", "", ":443", "[::1]", "\xe9vil.example",
])
@pytest.mark.parametrize(("method", "path"), [("GET", "/health"), *CLIENT_ROUTES, HUB_ROUTES[2]])
def test_a_host_that_does_not_name_the_server_is_421(api, address, method, path, host) -> None:
    body, ctype = body_for(method, path)
    logon, cert = logged_on(path)
    status, headers, answer = request(address, method, path, body, {**ctype, **logon, "Host": host}, cert)
    assert "does not name this server" in error_of(status, headers, answer), answer
    assert status == 421, (status, answer)
    nothing_got_through(api)


@pytest.mark.parametrize("host", ["127.0.0.1", "{address}", SERVER_NAME, SERVER_NAME.upper(), f"{SERVER_NAME}:443"])
def test_the_servers_own_names_are_hosts_it_answers(api, address, host) -> None:
    host = host.replace("{address}", host_of(address))
    status, _, answer = request(address, "GET", "/mailboxes/alice@contoso.com/folders/Inbox",
                                headers={**AS_ALICE, "Host": host})
    assert status == 200, answer


@pytest.mark.parametrize(("method", "path"), [
    ("DELETE", OUTBOX), ("PUT", OUTBOX), ("PATCH", OUTBOX), ("GET", OUTBOX),
    ("POST", "/mailboxes/alice@contoso.com/folders/Inbox"), ("DELETE", "/mailboxes/alice@contoso.com/folders/Inbox"),
    ("PUT", "/mailboxes/alice@contoso.com/folders/Inbox/x"), ("GET", "/hub/deliver"), ("DELETE", "/hub/deliver"),
    ("POST", "/health"), ("OPTIONS", "/health"), ("HEAD", "/health"), ("TRACE", "/health"),
    ("GET", "/"), ("GET", "/docs"), ("GET", "/mailboxes"), ("GET", "/hub"),
    ("GET", "/mailboxes/alice@contoso.com"), ("GET", "/mailboxes/alice@contoso.com/folders"),
    ("GET", "/mailboxes/alice@contoso.com/folders/Inbox/x/y"), ("POST", "/admin"), ("GET", "/%00"),
    ("GET", "/health/" + "x" * 5000), ("GET", "//health"),
])
def test_wrong_methods_and_unknown_routes_are_4xx_with_a_json_error(api, address, method, path) -> None:
    logon, cert = logged_on(path)
    status, headers, answer = request(address, method, path, b"{}" if method in ("POST", "PUT", "PATCH") else None,
                                      {**JSON, **logon}, cert)
    error_of(status, headers, answer, method)
    assert status in (404, 405), (status, answer)


# endregion

# region: random requests

segment = st.one_of(
    st.sampled_from(["alice@contoso.com", "bob@contoso.com", "carol@contoso.com", "Inbox", "Outbox", "Sent%20Items",
                     "inbox", "folders", "outbox", "hub", "mailboxes", "deliver", "submitted", "..", ".", "%2E%2E",
                     "%252E", "%00", "%2F", "%5C", "", "health", "x" * 300]),
    st.text(max_size=12).map(lambda t: quote(t, safe="")),
    st.binary(max_size=12).map(lambda b: quote(b, safe="")),
)
ROUTES = ["/mailboxes/{}/outbox", "/mailboxes/{}/folders/{}", "/mailboxes/{}/folders/{}/{}", "/hub/outbox/take",
          "/hub/outbox/submitted", "/hub/deliver", "/health"]
random_path = st.one_of(
    st.builds(lambda route, *parts: route.format(*parts), st.sampled_from(ROUTES),
              st.one_of(st.just("alice@contoso.com"), segment), st.one_of(st.sampled_from(["Inbox", "Outbox"]), segment),
              segment),
    st.lists(segment, min_size=1, max_size=6).map(lambda parts: "/" + "/".join(parts)),
)
KEYS = ["messages", "id", "recipients", "raw", "to", "cc", "bcc", "subject", "body", "message_id", "limit", "items",
        "mailbox"]
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.sampled_from(["alice@contoso.com", "SGk=", "m1", "<a@b>", "../x", "\r\nBcc: x"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner,
                                                                  max_size=4),
    max_leaves=12,
)
random_body = st.one_of(
    st.none(), st.binary(max_size=200), json_value.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"{}", b"[]", b"null", b'{"to": ["bob@contoso.com"], "subject": "hyp"}',
                     b"To: bob@contoso.com\r\nSubject: hyp\r\n\r\nhi\r\n", b"[" * 5000,
                     b'{"messages": [{"id": "hyp1", "recipients": ["alice@contoso.com"], "raw": "SGk="}]}']),
)
random_headers = st.fixed_dictionaries({}, optional={
    "Authorization": st.sampled_from([AS_ALICE["Authorization"], AS_ALICE["Authorization"],
                                      basic(ALICE[0], "wrong")["Authorization"], basic("bob@contoso.com", ALICE[1])
                                      ["Authorization"], f"Bearer {TOKEN}", "Bearer wrong", "Basic x", "Basic", ""]),
    "Content-Type": st.sampled_from(["application/json", "message/rfc822", "text/plain", "image/png", "",
                                     "application/json; charset=latin-1", "multipart/form-data; boundary=x"]),
    "Host": st.sampled_from([SERVER_NAME, "127.0.0.1", "evil.example", ""]),
})
# the client certificate presented: none (mostly), the site's hubs, or a node that may not use the hub API
random_cert = st.sampled_from([None, None, HUB, HUB, OTHER_SITE_HUB, MAILBOX_SERVERS[0]])


def test_random_requests_never_get_a_500(api, address) -> None:
    seen: dict[int, int] = {}

    @settings(max_examples=RANDOM_REQUESTS, deadline=None, derandomize=True, database=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.sampled_from(["GET", "POST", "POST", "PUT", "DELETE"]), random_path, random_body, random_headers,
           random_cert)
    def one(method: str, path: str, body: bytes | None, headers: dict[str, str], cert: pki.Identity | None) -> None:
        status, answer_headers, answer = request(address, method, path, body, headers, cert)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, f"{method} {path} -> {status} {answer[:300]!r}"
        if status >= 400:
            error_of(status, answer_headers, answer, method)
        assert CANARY not in answer

    started = time.monotonic()
    one()
    print(f"\n{RANDOM_REQUESTS} random requests in {time.monotonic() - started:.1f}s: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(seen.items())))


# endregion


def test_afterwards_the_server_is_healthy_and_nothing_was_written_outside_the_mailboxes(api) -> None:
    assert api.procs[SERVER].alive
    assert api.http.get(registry.server_url(api.r, SERVER) + "/health").status_code == 200
    store = api.data_dir / "mailboxes" / SERVER
    mailboxes = {store / m.address for m in ORG.mailboxes if m.server == SERVER}
    new = files(api.data_dir) - BEFORE
    outside = sorted(str(p) for p in new if not any(m in p.parents for m in mailboxes)
                     and api.data_dir / "logs" not in p.parents)
    assert not outside, f"files written outside the mailboxes: {outside}"
    for path in (api.data_dir / "secret.txt", store.parent / "secret.txt", store / "secret.txt"):
        assert path.read_bytes() == CANARY
    # and the listings still work, whatever was stored meanwhile
    for folder in ("Inbox", "Outbox", "Sent Items"):
        api.folder("alice@contoso.com", folder)
