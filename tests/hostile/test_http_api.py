"""The mailbox server's HTTP API under abuse, over real HTTP: malformed JSON, wrong types, path
traversal (plain, encoded and double-encoded) in mailbox, folder and item names, huge
bodies, missing and wrong server tokens, wrong methods, unknown routes, and a Hypothesis
run over random requests.

Every answer must be a 4xx with a JSON body ``{"error": "..."}`` (never a 500), no file may
appear outside the mailboxes' Maildirs, a body over the limit is refused with 413 without
the server reading (or keeping) more than the limit, and the server is healthy afterwards.

One exception, by design of the layers: requests that are not valid HTTP (a bad
Content-Length, an oversized header section) are refused by uvicorn before the application
sees them, with a plain-text 400; they are checked to be 4xx and harmless.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailyard import registry
from mailyard.testing.cluster import Cluster
from tests.conftest import make_org
from tests.hostile.helpers import rss_kb, running_site

SERVER = "MBX-AMS-01"
ORG = make_org()
TOKEN = ORG.transport.server_token
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
        yield cluster


@pytest.fixture(scope="module")
def address(api: Cluster) -> tuple[str, int]:
    url = registry.server_url(api.r, SERVER)
    host, _, port = url.removeprefix("http://").partition(":")
    return host, int(port)


def files(root: Path) -> set[Path]:
    return {Path(d) / f for d, _, names in os.walk(root) for f in names}


def request(address: tuple[str, int], method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request, sent exactly as given (the path is not normalised or re-encoded)."""
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
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


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


JSON = {"Content-Type": "application/json"}
OUTBOX = "/mailboxes/alice@contoso.com/outbox"


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
    status, headers, answer = request(address, "POST", OUTBOX, body, JSON)
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
    status, headers, answer = request(address, "POST", "/hub/deliver", body, {**JSON, **bearer()})
    assert needle in error_of(status, headers, answer), answer


def test_a_delivery_to_addresses_that_are_not_mailboxes_here_is_refused_per_recipient(api, address) -> None:
    raw = base64.b64encode(b"Subject: tricks\r\n\r\nx\r\n").decode()
    tricks = ["../../secret.txt", "../bob@contoso.com", "alice@contoso.com/../../x", "alice@contoso.com\u0000",
              ".alice@contoso.com", "carol@contoso.com", "ali\u0307ce@contoso.com", "alice@contoso.com "]
    body = json.dumps({"messages": [{"id": "tricks1", "recipients": tricks, "raw": raw}]}).encode()
    status, _, answer = request(address, "POST", "/hub/deliver", body, {**JSON, **bearer()})
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
    "/hub/outbox/alice@contoso.com/..%2F..%2Fsecret.txt",
    "/hub/outbox/alice@contoso.com/..",
    "/hub/outbox/..%2Fsecret.txt/x",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_is_a_404_and_reads_nothing_outside_the_store(api, address, path: str) -> None:
    status, headers, answer = request(address, "GET", path, headers=bearer())
    error_of(status, headers, answer)
    assert status == 404, (status, answer)
    assert CANARY not in answer and b"root:" not in answer


@pytest.mark.parametrize("path", [
    "/hub/outbox/alice@contoso.com/..%2F..%2Fsecret.txt/submitted",
    "/hub/outbox/alice@contoso.com/..%252F..%252Fsecret.txt/submitted",
    "/hub/outbox/..%2F..%2Fsecret.txt/x/submitted",
    "/hub/outbox/alice@contoso.com/new/submitted",
    "/hub/outbox/alice@contoso.com/mailyard-submitted/submitted",
    "/mailboxes/..%2F..%2Fsecret.txt/outbox",
    "/mailboxes/alice@contoso.com%2F..%2F..%2Fx/outbox",
])
def test_writes_through_traversal_paths_are_refused(api, address, path: str) -> None:
    raw = b"To: bob@contoso.com\r\nSubject: traversal\r\n\r\nx\r\n"
    status, headers, answer = request(address, "POST", path, raw, {"Content-Type": "message/rfc822", **bearer()})
    error_of(status, headers, answer)
    assert status == 404, (status, answer)


# endregion

# region: huge bodies


def test_a_declared_body_over_the_limit_is_413_before_it_is_read(api, address) -> None:
    for path, headers in ((OUTBOX, {"Content-Type": "message/rfc822"}), ("/hub/deliver", {**JSON, **bearer()})):
        with socket.create_connection(address, timeout=30) as s:
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {10 ** 12}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
            s.sendall(head.encode() + b"x" * 1000)  # and no more: the answer must not wait for the rest
            answer = read_response(s)
        status_line, _, rest = answer.partition(b"\r\n")
        assert b" 413 " in status_line, answer[:300]
        assert b"larger than the limit" in rest


def chunked_upload(address: tuple[str, int], path: str, headers: dict[str, str], total: int) -> tuple[bytes, int]:
    """Stream ``total`` bytes with chunked encoding (no Content-Length); return the answer and how
    much the server let us send before it answered and stopped reading."""
    sent = 0
    chunk = b"x" * 65536
    with socket.create_connection(address, timeout=30) as s:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        s.sendall(head.encode())
        try:
            while sent < total:
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
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
        return out + b"\r\n" + f.read(length)
    except (ConnectionResetError, TimeoutError):
        return out


def test_a_streamed_body_over_the_limit_is_413_and_not_buffered(api, address) -> None:
    pid = api.procs[SERVER].pid
    before = rss_kb(pid)
    answer, sent = chunked_upload(address, OUTBOX, {"Content-Type": "message/rfc822"}, 6 * LIMIT)
    after = rss_kb(pid)
    print(f"\nstreamed {sent / 2**20:.1f} MB of a {6 * LIMIT / 2**20:.0f} MB body before the server stopped "
          f"reading; mailbox server RSS {before / 1024:.1f} -> {after / 1024:.1f} MB")
    assert sent < 3 * LIMIT, "the server kept reading far past the limit"
    assert after - before < 3 * LIMIT // 1024, "the server buffered far more than the limit"
    if answer:  # (the reset may beat the answer to the client; the server must still be fine)
        assert b" 413 " in answer.partition(b"\r\n")[0], answer[:300]
        assert b"larger than the limit" in answer
    assert api.http.get(registry.server_url(api.r, SERVER) + "/health").status_code == 200


def test_a_hub_body_without_the_token_is_refused_before_it_is_read(api, address) -> None:
    answer, sent = chunked_upload(address, "/hub/deliver", JSON, 4 * LIMIT)
    assert sent < 3 * LIMIT
    if answer:
        assert b" 401 " in answer.partition(b"\r\n")[0], answer[:300]


@pytest.mark.parametrize("head", [
    b"POST /mailboxes/alice@contoso.com/outbox HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /mailboxes/alice@contoso.com/outbox HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n",
    b"POST /mailboxes/alice@contoso.com/outbox HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2_000_000 + b"\r\n\r\n",
                 id="a 2 MB header"),
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(50_000))
                 + b"\r\n", id="50000 headers"),
    b"BREW /health HTCPCP/1.0\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100,  # TLS to a plain HTTP port
])
def test_invalid_http_is_refused_by_the_server_layer(api, address, head: bytes) -> None:
    with socket.create_connection(address, timeout=30) as s:
        try:
            s.sendall(head)
            answer = read_response(s)
        except (BrokenPipeError, ConnectionResetError):
            answer = b""
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, answer[:300]
    assert api.http.get(registry.server_url(api.r, SERVER) + "/health").status_code == 200


# endregion

# region: tokens, methods, routes


@pytest.mark.parametrize(
    ("headers", "status", "needle"),
    [
        ({}, 401, "server token required"),
        ({"Authorization": ""}, 401, "server token required"),
        ({"Authorization": "Bearer"}, 401, "server token required"),
        ({"Authorization": f"Basic {base64.b64encode(TOKEN.encode()).decode()}"}, 401, "server token required"),
        ({"Authorization": f"bearer {TOKEN}"}, 401, "server token required"),
        # (h11 strips trailing white space from header values, as RFC 9110 says: "Bearer " is no token)
        ({"Authorization": "Bearer "}, 401, "server token required"),
        ({"Authorization": "Bearer wrong"}, 403, "wrong server token"),
        ({"Authorization": f"Bearer  {TOKEN}"}, 403, "wrong server token"),
        ({"Authorization": f"Bearer {TOKEN[:-1]}"}, 403, "wrong server token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, 403, "wrong server token"),
        ({"Authorization": "Bearer \xe9\xff"}, 403, "wrong server token"),
        ({"X-Server-Token": TOKEN}, 401, "server token required"),
    ],
)
@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/hub/outbox/alice@contoso.com/x"),
    ("POST", "/hub/outbox/alice@contoso.com/x/submitted"),
    ("POST", "/hub/deliver"),
])
def test_hub_routes_need_the_right_server_token(api, address, method, path, headers, status, needle) -> None:
    body = b'{"messages": [{"id": "tok1", "recipients": ["alice@contoso.com"], "raw": ""}]}' if method == "POST" else None
    got, answer_headers, answer = request(address, method, path, body, {**JSON, **headers})
    assert got == status and needle in error_of(got, answer_headers, answer), answer
    assert not any(".Ytok1." in i["id"] for i in api.folder("alice@contoso.com")), "delivered without the token"


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
    status, headers, answer = request(address, method, path, b"{}" if method in ("POST", "PUT", "PATCH") else None,
                                      bearer())
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
ROUTES = ["/mailboxes/{}/outbox", "/mailboxes/{}/folders/{}", "/mailboxes/{}/folders/{}/{}", "/hub/outbox/{}/{}",
          "/hub/outbox/{}/{}/submitted", "/hub/deliver", "/health"]
random_path = st.one_of(
    st.builds(lambda route, *parts: route.format(*parts), st.sampled_from(ROUTES),
              st.one_of(st.just("alice@contoso.com"), segment), st.one_of(st.sampled_from(["Inbox", "Outbox"]), segment),
              segment),
    st.lists(segment, min_size=1, max_size=6).map(lambda parts: "/" + "/".join(parts)),
)
KEYS = ["messages", "id", "recipients", "raw", "to", "cc", "bcc", "subject", "body", "message_id"]
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
    "Authorization": st.sampled_from([f"Bearer {TOKEN}", "Bearer wrong", "Basic x", ""]),
    "Content-Type": st.sampled_from(["application/json", "message/rfc822", "text/plain", "image/png", "",
                                     "application/json; charset=latin-1", "multipart/form-data; boundary=x"]),
})


def test_random_requests_never_get_a_500(api, address) -> None:
    seen: dict[int, int] = {}

    @settings(max_examples=RANDOM_REQUESTS, deadline=None, derandomize=True, database=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.sampled_from(["GET", "POST", "POST", "PUT", "DELETE"]), random_path, random_body, random_headers)
    def one(method: str, path: str, body: bytes | None, headers: dict[str, str]) -> None:
        status, answer_headers, answer = request(address, method, path, body, headers)
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
