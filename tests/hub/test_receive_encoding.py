"""What a receive connector takes in (issue 12, items 9 to 11), over SMTP as clients send it:
SMTPUTF8 addresses (RFC 6531), bare LF line ends, and lines over 998 octets. Anonymous
clients from 127.0.0.2 use the ``Internet`` connector."""

from __future__ import annotations

import email
import smtplib
import uuid
from email import policy

import pytest

from mailyard.org import Organization
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from tests.conftest import ROOT
from tests.hub.receive_site import HUB, connect, receive_org

JURGEN = "jürgen@contoso.com"
INTERNET = "127.0.0.2"


def encoding_org() -> Organization:
    data = receive_org().model_dump(mode="json")
    data["accepted_domains"].append("bücher.example")
    data["mailboxes"].append({"address": JURGEN, "server": "MBX-AMS-01",
                              "aliases": ["jürgen@bücher.example", "juergen@bücher.example"]})
    return Organization.model_validate(data)


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory):
    cluster = Cluster(redis_server.new_db(), tmp_path_factory.mktemp("rx-encoding"), encoding_org(), cwd=ROOT)
    try:
        cluster.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
        cluster.start_hub("Amsterdam", HUB)
        yield cluster
    finally:
        cluster.close()


def tag(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:6]}"


def command(client: smtplib.SMTP, line: bytes) -> tuple[int, str]:
    """One command as raw bytes (smtplib would refuse to send non-ASCII without SMTPUTF8)."""
    client.send(line + b"\r\n")
    code, text = client.getreply()
    return code, text.decode()


def send_data(client: smtplib.SMTP, sender: bytes, rcpt: bytes, content: bytes) -> tuple[int, str]:
    """A whole transaction with ``content`` sent exactly as given (no dot-stuffing, no line-end
    repair: smtplib would do both), then the terminating CRLF.CRLF."""
    assert command(client, b"MAIL FROM:<" + sender + b">")[0] == 250
    assert command(client, b"RCPT TO:<" + rcpt + b">")[0] == 250
    assert command(client, b"DATA")[0] == 354
    client.send(content + b"\r\n.\r\n")
    code, text = client.getreply()
    return code, text.decode()


def inbox_copy(site: Cluster, address: str, subject: str) -> bytes:
    (item,) = site.wait_for_subject(address, subject)
    return site.raw(address, item["id"])


def test_smtputf8_in_a_utf8_sender_and_recipient_reach_the_mailbox(site: Cluster) -> None:
    s = tag("grüße")
    raw = f"From: José <josé@fabrikam.example>\r\nTo: {JURGEN}\r\nSubject: {s}\r\n\r\nhola\r\n".encode()
    with connect(site, "Internet", INTERNET) as client:
        assert client.has_extn("smtputf8")
        client.sendmail("josé@fabrikam.example", ["Jürgen@xn--bcher-kva.example"], raw, mail_options=["SMTPUTF8"])
    stored = inbox_copy(site, JURGEN, s)
    assert b"with UTF8SMTP id" in stored  # RFC 6531 4.3
    assert "From: José <josé@fabrikam.example>\r\n".encode() in stored  # UTF-8 headers as sent (RFC 6532)


def test_a_utf8_address_without_the_smtputf8_parameter_is_553_5_6_7(site: Cluster) -> None:
    with connect(site, "Internet", INTERNET) as client:
        assert command(client, "MAIL FROM:<josé@fabrikam.example>".encode()) == (
            553, "5.6.7 Must declare SMTPUTF8 to send unicode address")
        assert command(client, b"MAIL FROM:<jose@fabrikam.example>")[0] == 250
        assert command(client, f"RCPT TO:<{JURGEN}>".encode())[0] == 553
        # an ASCII local part in an IDN domain, as A-labels, is plain ASCII SMTP
        assert command(client, b"RCPT TO:<juergen@xn--bcher-kva.example>") == (250, "2.1.5 Recipient OK")


def test_a_message_with_bare_lf_line_ends_is_taken_with_crlf_and_a_bare_lf_dot_does_not_end_it(site: Cluster) -> None:
    s = tag("bare lf")
    lines = [f"Subject: {s}", "From: sender@fabrikam.example", ""] + [f"short line {i}" for i in range(80)]
    content = "\n".join([*lines, ".", "still the message"]).encode()  # 1,300 bytes without a CRLF
    with connect(site, "Internet", INTERNET) as client:
        code, text = send_data(client, b"sender@fabrikam.example", b"bob@contoso.com", content)
        assert code == 250, text
    stored = inbox_copy(site, "bob@contoso.com", s)
    assert b"\n" not in stored.replace(b"\r\n", b""), "every line ends in CRLF"
    assert stored.endswith(b"short line 79\r\n.\r\nstill the message\r\n")


def test_a_body_line_over_998_octets_is_taken_and_re_encoded_once(site: Cluster) -> None:
    s = tag("long body line")
    line = b"0123456789" * 150
    with connect(site, "Internet", INTERNET) as client:
        code, text = send_data(client, b"sender@fabrikam.example", b"bob@contoso.com",
                               f"Subject: {s}\r\n\r\n".encode() + line + b"\r\nend")
        assert code == 250, text
    stored = inbox_copy(site, "bob@contoso.com", s)
    assert max(map(len, stored.split(b"\r\n"))) <= 998
    msg = email.message_from_bytes(stored, policy=policy.default)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert msg.get_payload(decode=True) == line + b"\r\nend\r\n"


def test_a_header_line_over_998_octets_is_refused_naming_the_line_by_smtp_and_by_the_mailbox_api(site: Cluster) -> None:
    header = b"X-Long: " + b"v" * 1500
    with connect(site, "Internet", INTERNET) as client:
        code, text = send_data(client, b"sender@fabrikam.example", b"bob@contoso.com",
                               b"Subject: long header\r\n" + header + b"\r\n\r\nbody")
    assert (code, text) == (554, "5.6.0 Message refused: header line 2 is 1508 octets long; at most 998 may "
                                 "cross SMTP")
    response = site.send_raw("alice@contoso.com", b"To: bob@contoso.com\r\n" + header + b"\r\n\r\nbody\r\n")
    assert response.status_code == 400
    assert "header line 2 is 1508 octets long" in response.json()["error"]
