"""The SMTP session over real sockets: what a connector offers (STARTTLS, AUTH, SIZE), the
limits that close a connection, Exchange's replies, DATA read exactly as RFC 5321 says (no
smuggling), BDAT (RFC 3030) and pipelined bursts (RFC 2920), and the fast reading of plain
addresses. What each command is answered is in
test_receive_handler.py (over sockets) and test_receive_policy.py (the decisions alone)."""

from __future__ import annotations

import asyncio
import base64
import select
import smtplib
import socket
import ssl
import uuid
from typing import Any

import pytest

from mailyard.hub.receive_protocol import SIMPLE_PATH
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.hub.receive_site import HUB, connect, receive_site, reply, tls


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory):
    with receive_site(redis_server, tmp_path_factory.mktemp("receive-protocol")) as cluster:
        yield cluster


# region: what a connector offers, and the limits that close a connection


def test_auth_is_offered_only_after_starttls_where_tls_is_required(site: Cluster) -> None:
    client = connect(site)
    assert "starttls" in client.esmtp_features and "auth" not in client.esmtp_features
    plain = base64.b64encode(b"\0alice@contoso.com\0alice-demo-password").decode()
    code, _ = reply(client, f"AUTH PLAIN {plain}")
    assert code in (530, 538), "AUTH in clear text must be refused"
    tls(client)
    assert "auth" in client.esmtp_features
    client.quit()


def test_a_connector_without_tls_offers_no_starttls_and_one_without_logons_no_auth(site: Cluster) -> None:
    client = connect(site, "Apps", source="127.0.0.5")
    assert "starttls" not in client.esmtp_features and "auth" not in client.esmtp_features
    assert "enhancedstatuscodes" in client.esmtp_features
    client.quit()


def test_three_failed_logons_close_the_connection(site: Cluster) -> None:
    client = tls(connect(site))
    for _ in range(2):
        code, text = reply(client, "AUTH PLAIN " + base64.b64encode(b"\0alice@contoso.com\0bad").decode())
        assert (code, text) == (535, "5.7.3 Authentication unsuccessful")
    code, _ = reply(client, "AUTH PLAIN " + base64.b64encode(b"\0alice@contoso.com\0bad").decode())
    assert code == 535
    with pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)):
        client.docmd("NOOP")
        client.docmd("NOOP")


def test_size_is_advertised_and_enforced(site: Cluster) -> None:
    client = connect(site, "Limited")
    assert client.esmtp_features["size"] == str(4 * 1024)
    assert reply(client, "MAIL FROM:<a@example.org> SIZE=999999") == (
        552, "5.3.4 Message size exceeds fixed maximum message size")
    assert reply(client, "MAIL FROM:<a@example.org>")[0] == 250
    assert reply(client, "RCPT TO:<bob@contoso.com>")[0] == 250
    code, text = client.data(b"Subject: big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 80)
    assert (code, text) == (552, b"5.3.4 Message size exceeds fixed maximum message size")
    client.quit()


def test_connections_per_source_are_capped(site: Cluster) -> None:
    host, port = site.smtp(HUB, "Limited")
    # (connections of earlier tests are released asynchronously, a moment after QUIT)
    held = [wait_until(lambda: connect(site, "Limited"), timeout=10) for _ in range(2)]
    with socket.create_connection((host, port), timeout=10) as third:
        greeting = third.recv(200).decode()
    assert greeting.startswith("421 4.3.2"), greeting
    for client in held:
        client.quit()
    wait_until(lambda: connect(site, "Limited").quit(), timeout=10)


def test_a_client_that_no_connector_of_the_binding_admits_is_told_421(site: Cluster) -> None:
    host, port = site.smtp(HUB, "Apps")  # Apps alone listens there, for 127.0.0.5 only
    with smtplib.SMTP(timeout=15) as outsider:
        outsider.source_address = ("127.0.0.6", 0)
        code, text = outsider.connect(host, port)
    assert code == 421, f"a client outside the range got {code} {text!r}"


def test_replies_carry_enhanced_status_codes(site: Cluster) -> None:
    client = connect(site, "Internet", source="127.0.0.2")
    assert reply(client, "RCPT TO:<bob@contoso.com>") == (503, "5.5.2 Need mail command")
    assert reply(client, "DATA") == (503, "5.5.1 Need MAIL command")
    assert reply(client, "FOO")[1].startswith("5.3.3")
    assert reply(client, "NOOP") == (250, "2.0.0 OK")
    # 2xx replies too (RFC 2034), and HELP is 214 (RFC 5321 4.2.3)
    code, text = reply(client, "VRFY <bob@contoso.com>")
    assert code == 252 and text.startswith("2.0.0 "), text
    code, text = reply(client, "HELP")
    assert code == 214 and text.startswith("2.0.0 Supported commands:"), text
    assert reply(client, "MAIL FROM:<someone@fabrikam.example>")[0] == 250
    assert reply(client, "DATA") == (503, "5.5.2 Need rcpt command"), "MAIL, but no RCPT yet"
    client.quit()


def test_what_the_client_said_in_ehlo_cannot_forge_text_in_our_received_header(site: Cluster) -> None:
    subject = f"ehlo {uuid.uuid4().hex[:6]}"
    client = connect(site, "Internet", source="127.0.0.2")
    assert reply(client, "EHLO evil\x00name) by trusted.example (\x01")[0] == 250
    assert reply(client, "MAIL FROM:<someone@fabrikam.example>")[0] == 250
    assert reply(client, "RCPT TO:<carol@contoso.com>")[0] == 250
    assert reply(client, "DATA")[0] == 354
    client.send(f"Subject: {subject}\r\n\r\nno Date header\r\n.\r\n".encode())
    assert client.getreply()[0] == 250
    client.quit()
    (item,) = site.wait_for_subject("carol@contoso.com", subject)
    raw = site.raw("carol@contoso.com", item["id"])
    received = next(line for line in raw.split(b"\r\n") if line.startswith(b"Received: from evil"))
    assert received.startswith(b"Received: from evil?name??by?trusted.example??? ([127.0.0.2]) by "), received
    assert b"\x00" not in raw.split(b"\r\n\r\n")[0]
    assert b"\r\nDate: " in raw.split(b"\r\n\r\n")[0], "a message without Date gets one (RFC 5322)"


# endregion

# region: DATA


def test_smtp_smuggling_does_not_split_a_message(site: Cluster) -> None:
    subject = f"smuggle {uuid.uuid4().hex[:6]}"
    host, port = site.smtp(HUB, "Internet")
    payload = (
        f"Subject: {subject}\r\n\r\nfirst part\n.\nMAIL FROM:<evil@example.org>\r\n"
        "RCPT TO:<carol@contoso.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nsecond\r\n"
        "text\r\n.\nmore\n.\r\nstill the same message\r\n.\r\n"
    ).encode()
    with socket.create_connection((host, port), timeout=10, source_address=("127.0.0.2", 0)) as s:
        f = s.makefile("rb")
        f.readline()
        for line in (b"EHLO client.example\r\n", b"MAIL FROM:<x@example.org>\r\n", b"RCPT TO:<bob@contoso.com>\r\n",
                     b"DATA\r\n"):
            s.sendall(line)
            while (resp := f.readline())[3:4] == b"-":
                pass
        assert resp.startswith(b"354")
        s.sendall(payload)
        assert f.readline().startswith(b"250")
        s.sendall(b"QUIT\r\n")
    (item,) = site.wait_for_subject("bob@contoso.com", subject)
    body = site.raw("bob@contoso.com", item["id"])
    assert b"still the same message" in body and b"Subject: smuggled" in body
    assert "smuggled" not in site.subjects("carol@contoso.com")
    assert "smuggled" not in site.subjects("bob@contoso.com")


# endregion

# region: BDAT (RFC 3030) and PIPELINING (RFC 2920)


def raw_session(site: Cluster, connector: str = "Internet", source: str = "127.0.0.2") -> tuple[socket.socket, Any]:
    s = socket.create_connection(site.smtp(HUB, connector), timeout=30, source_address=(source, 0))
    f = s.makefile("rb")
    assert f.readline().startswith(b"220")
    return s, f


def replies(f: Any, n: int) -> list[str]:
    """The next ``n`` replies, each as its last line ("250 2.1.5 Recipient OK")."""
    got = []
    for _ in range(n):
        while (line := f.readline())[3:4] == b"-":
            pass
        got.append(line.decode().rstrip("\r\n"))
    return got


def bdat(chunk: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk


ENVELOPE = b"EHLO client.example\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<bob@contoso.com>\r\n"


def test_pipelining_and_chunking_are_advertised(site: Cluster) -> None:
    client = connect(site, "Internet", source="127.0.0.2")
    assert "pipelining" in client.esmtp_features and "chunking" in client.esmtp_features
    assert "binarymime" not in client.esmtp_features
    client.quit()


def test_one_bdat_last_takes_a_message_as_it_is_without_dot_stuffing(site: Cluster) -> None:
    subject = f"bdat {uuid.uuid4().hex[:6]}"
    # What would end (or split) a DATA section is plain content here, leading dots included.
    message = (f"Subject: {subject}\r\n\r\n..two dots\r\n.\r\nMAIL FROM:<evil@example.org>\r\n"
               "RCPT TO:<carol@contoso.com>\r\n\x00 and 8-bit \xff\r\n").encode("latin-1")
    s, f = raw_session(site)
    with s:
        s.sendall(ENVELOPE + bdat(message, last=True))
        got = replies(f, 4)
        assert got[1:3] == ["250 2.1.0 Sender OK", "250 2.1.5 Recipient OK"], got
        assert got[3].startswith("250 2.6.0 ") and "Queued mail for delivery" in got[3], got
        s.sendall(b"QUIT\r\n")
    (item,) = site.wait_for_subject("bob@contoso.com", subject)
    assert site.raw("bob@contoso.com", item["id"]).endswith(message.split(b"\r\n\r\n", 1)[1])
    assert site.subjects("carol@contoso.com").count(subject) == 0


def test_chunks_pipelined_in_one_write_make_one_message_and_bdat_0_last_ends_it(site: Cluster) -> None:
    subject = f"chunks {uuid.uuid4().hex[:6]}"
    message = f"Subject: {subject}\r\n\r\n".encode() + b"".join(b"line %d\r\n" % i for i in range(200))
    parts = [message[:7], message[7:1001], message[1001:-1], message[-1:]]  # CRLFs split across chunks
    s, f = raw_session(site)
    with s:
        s.sendall(ENVELOPE + b"".join(map(bdat, parts)) + bdat(b"", last=True))
        got = replies(f, 3 + len(parts) + 1)
        assert got[3:-1] == [f"250 2.6.0 CHUNK received OK, {len(p)} octets" for p in parts], got
        assert got[-1].startswith("250 2.6.0 ") and "Queued mail" in got[-1], got
        s.sendall(b"QUIT\r\n")
    (item,) = site.wait_for_subject("bob@contoso.com", subject)
    assert site.raw("bob@contoso.com", item["id"]).endswith(message.split(b"\r\n\r\n", 1)[1])


def test_a_chunk_over_the_size_limit_is_refused_and_the_rest_read_and_dropped(site: Cluster) -> None:
    s, f = raw_session(site, "Limited", source="127.0.0.1")  # 4 KB
    with s:
        s.sendall(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<bob@contoso.com>\r\n"
                  + bdat(b"x" * 3000) + bdat(b"MAIL FROM:<b@example.org>\r\n" * 60) + bdat(b"NOOP\r\n", last=True)
                  + b"NOOP\r\n")
        assert replies(f, 7)[3:] == [
            "250 2.6.0 CHUNK received OK, 3000 octets",
            "552 5.3.4 Message size exceeds fixed maximum message size",
            "503 5.5.1 Need MAIL command",  # the transaction ended with the 552 (RFC 3030 §4.2)
            "250 2.0.0 OK",  # in step: no octet of a chunk was taken for a command
        ]
        s.sendall(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bob@contoso.com>\r\n" + bdat(b"x" * 5000, last=True)
                  + b"MAIL FROM:<a@example.org>\r\n")
        assert replies(f, 4) == ["250 2.1.0 Sender OK", "250 2.1.5 Recipient OK",
                                 "552 5.3.4 Message size exceeds fixed maximum message size", "250 2.1.0 Sender OK"]


def test_bdat_without_a_transaction_is_503_and_its_octets_are_still_read(site: Cluster) -> None:
    s, f = raw_session(site)
    with s:
        chunk = b"RSET\r\nQUIT\r\n"  # octets of a chunk, never commands
        s.sendall(b"EHLO client.example\r\n" + bdat(chunk, last=True) + b"MAIL FROM:<x@example.org>\r\n"
                  + bdat(chunk) + b"NOOP\r\n" + b"BDAT 12 LAST\r\n")
        assert replies(f, 5)[1:] == ["503 5.5.1 Need MAIL command", "250 2.1.0 Sender OK",
                                     "503 5.5.2 Need rcpt command", "250 2.0.0 OK"]
        s.sendall(b"QUIT\r\nQUIT")  # the 12 octets of the last BDAT: no reply before they are all here
        assert select.select([s], [], [], 0.5)[0] == [], "a reply before the chunk was complete"
        s.sendall(b"\r\n" + b"RSET\r\nBDAT x\r\n")
        assert replies(f, 3) == ["503 5.5.2 Need rcpt command", "250 2.0.0 OK",
                                 "501 5.5.4 Syntax: BDAT chunk-size [LAST]"]


def test_data_in_a_transaction_begun_with_bdat_is_503_and_rset_clears_it(site: Cluster) -> None:
    subject = f"after rset {uuid.uuid4().hex[:6]}"
    s, f = raw_session(site)
    with s:
        s.sendall(ENVELOPE + bdat(b"Subject: dropped\r\n") + b"DATA\r\nRSET\r\n" + bdat(b"\r\nnot a message\r\n", True)
                  + b"MAIL FROM:<x@example.org>\r\nRCPT TO:<bob@contoso.com>\r\n"
                  + bdat(f"Subject: {subject}\r\n\r\nafter RSET\r\n".encode(), last=True))
        got = replies(f, 9)
        assert got[3:8] == ["250 2.6.0 CHUNK received OK, 18 octets", "503 5.5.1 Bad sequence of commands",
                            "250 2.0.0 OK", "503 5.5.1 Need MAIL command", "250 2.1.0 Sender OK"], got
        assert got[8] == "250 2.1.5 Recipient OK"
        assert replies(f, 1)[0].startswith("250 2.6.0 ")
    (item,) = site.wait_for_subject("bob@contoso.com", subject)
    body = site.raw("bob@contoso.com", item["id"])
    assert b"Subject: dropped" not in body and b"not a message" not in body


def test_a_pipelined_burst_is_answered_in_order_in_one_write(site: Cluster) -> None:
    subject = f"burst {uuid.uuid4().hex[:6]}"
    # (4 of the 8 refused: under the 10 errors after which an anonymous session is closed)
    rcpts = ["bob@contoso.com", "nobody@contoso.com", "carol@contoso.com", "friend@fabrikam.example"] * 2
    s, f = raw_session(site)
    with s:
        s.sendall(b"EHLO client.example\r\nMAIL FROM:<x@example.org>\r\n"
                  + b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts) + b"DATA\r\n")
        # One write of the server reaches a loopback socket whole: the group's replies come in
        # one recv when they were sent as one unit (RFC 2920 §3.2), not one segment per reply.
        first = s.recv(65536)
        assert first.endswith(b"\r\n354 Start mail input; end with <CRLF>.<CRLF>\r\n"), first
        lines = [line for line in first.decode().split("\r\n") if line and line[3] == " "]
        expected = {"bob@contoso.com": "250 2.1.5 Recipient OK", "carol@contoso.com": "250 2.1.5 Recipient OK",
                    "nobody@contoso.com": "550 5.1.1 User unknown", "friend@fabrikam.example": "550 5.7.1 Unable to relay"}
        assert lines[1:-1] == ["250 2.1.0 Sender OK", *(expected[r] for r in rcpts)], lines
        s.sendall(f"Subject: {subject}\r\n\r\nburst\r\n.\r\nQUIT\r\n".encode())
        assert f.readline().startswith(b"250 2.6.0 ")
    for rcpt in ("bob@contoso.com", "carol@contoso.com"):
        site.wait_for_subject(rcpt, subject)


def test_commands_pipelined_after_starttls_are_discarded(site: Cluster) -> None:
    s, f = raw_session(site, "Default", source="127.0.0.1")
    s.sendall(b"EHLO client.example\r\nSTARTTLS\r\nMAIL FROM:<alice@contoso.com>\r\n")
    assert replies(f, 2)[1].startswith("220 ")
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with ctx.wrap_socket(s) as t:
        f = t.makefile("rb")
        t.sendall(b"EHLO client.example\r\nRCPT TO:<bob@contoso.com>\r\n")
        assert replies(f, 2)[1] == "503 5.5.2 Need mail command", "the plaintext MAIL was acted on"


# endregion

# region: reading addresses (no socket)


@pytest.mark.parametrize("arg", [
    "<a@b.example>", " <first.last+tag@mail.example.co.uk> SIZE=100 BODY=8BITMIME", "<a@b.example> ",
    "<a@b.example>\tX", "<user%other@contoso.com>", "<A!B@C.EXAMPLE>",
])
def test_plain_addresses_take_a_fast_path_that_reads_them_as_the_rfc_5322_parser_does(arg: str) -> None:
    from aiosmtpd.smtp import SMTP

    simple = SIMPLE_PATH.match(arg)
    assert simple, f"{arg!r} is a plain path"
    parsed = SMTP._getaddr(SMTP(object(), loop=asyncio.new_event_loop()), arg)
    assert (f"{simple['local']}@{simple['domain']}", simple["rest"] or "") == parsed, arg


@pytest.mark.parametrize("arg", [
    "<a..b@c.example>", "<.a@c.example>", "<a@-b.example>", "<a@b..example>", "<a@b.example.>", '<"q"@b.example>',
    "<a@[1.2.3.4]>", "<@x.example:a@b.example>", "<a@b.example", "a@b.example", "<a@b.example>SIZE=1",
    "<a@b.example> \nX", "<é@b.example>", "<a@b_c.example>", "<>",
])
def test_every_other_address_goes_to_the_rfc_5322_parser(arg: str) -> None:
    assert SIMPLE_PATH.match(arg) is None, f"{arg!r} must be judged by the full parser"


# endregion
