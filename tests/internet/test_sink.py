"""The SMTP sink, driven by real SMTP clients (smtplib, aiosmtplib) over loopback sockets."""

from __future__ import annotations

import asyncio
import json
import smtplib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from mailyard.internet.sink import (
    MAILBOX_BUSY,
    NO_SUCH_USER,
    Mode,
    Rule,
    Sink,
    list_messages,
    read_message,
)
from mailyard.testing.waiting import wait_until

SENDER = "alice@contoso.com"


def message(subject: str = "Hello", to: str = "grace@fabrikam.example", msgid: str = "<1@contoso.com>") -> bytes:
    return (f"From: Alice <{SENDER}>\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {msgid}\r\n"
            f"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n\r\nHi Grace,\r\n.a line starting with a dot (stuffed in transit)\r\n").encode()


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    with Sink(tmp_path / "internet") as sink:
        yield sink


def connect(sink: Sink, timeout: float = 5) -> smtplib.SMTP:
    return smtplib.SMTP(*sink.address, timeout=timeout)


def test_messages_are_stored_per_recipient_domain_and_listed(sink) -> None:
    with connect(sink) as client:
        refused = client.sendmail(SENDER, ["grace@fabrikam.example", "henry@fabrikam.example",
                                           "ivan@tailspintoys.example"], message())
    assert refused == {}

    fabrikam = list_messages(sink.folder, "Fabrikam.Example.")
    assert len(fabrikam) == 1
    item = fabrikam[0]
    assert item["from"] == SENDER and item["to"] == ["grace@fabrikam.example"]
    assert item["subject"] == "Hello" and item["message_id"] == "<1@contoso.com>"
    assert item["envelope_from"] == SENDER
    assert item["envelope_to"] == ["grace@fabrikam.example", "henry@fabrikam.example"]
    assert item["peer"][0] == "127.0.0.1" and item["tls"] is False and item["auth_user"] is None
    # The .eml is the message exactly as sent, the envelope is beside it.
    eml = Path(item["file"])
    assert eml.parent == sink.folder / "fabrikam.example"
    assert eml.read_bytes() == message()
    sidecar = json.loads(eml.with_suffix(".json").read_text())
    assert sidecar["rcpt_to_all"] == ["grace@fabrikam.example", "henry@fabrikam.example",
                                      "ivan@tailspintoys.example"]
    assert read_message(eml)["Subject"] == "Hello"
    assert [m["envelope_to"] for m in sink.messages("tailspintoys.example")] == [["ivan@tailspintoys.example"]]
    assert list_messages(sink.folder, "wingtiptoys.example") == []
    assert not list(sink.folder.rglob("*.tmp"))
    assert sink.stats().messages == 1


def test_messages_are_listed_in_arrival_order(sink) -> None:
    with connect(sink) as client:
        for i in range(5):
            client.sendmail(SENDER, ["grace@fabrikam.example"], message(f"n{i}", msgid=f"<{i}@c>"))
    assert [m["subject"] for m in sink.messages("fabrikam.example")] == [f"n{i}" for i in range(5)]


def test_several_messages_over_one_connection_are_counted(sink) -> None:
    with connect(sink) as client:
        for i in range(3):
            client.sendmail(SENDER, ["grace@fabrikam.example"], message(f"m{i}"))
    with connect(sink) as client:
        client.sendmail(SENDER, ["grace@fabrikam.example"], message("alone"))
    stats = sink.stats()
    assert stats.connections == 2 and stats.transactions == (3, 1) and stats.messages == 4
    sink.reset_stats()
    assert sink.stats().connections == 0 and sink.stats().transactions == ()


def test_a_temporary_failure_for_the_first_attempts_then_acceptance(sink) -> None:
    sink.add_rule("grace@fabrikam.example", MAILBOX_BUSY, times=2)
    for _attempt in range(2):
        with connect(sink) as client, pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail(SENDER, ["Grace@Fabrikam.example"], message())
        assert refused.value.recipients["Grace@Fabrikam.example"][0] == 450
    with connect(sink) as client:
        assert client.sendmail(SENDER, ["grace@fabrikam.example"], message()) == {}
    assert len(sink.messages("fabrikam.example")) == 1
    assert sink.stats().attempts("grace@fabrikam.example") == 3
    assert [code for _, code in sink.stats().rcpt_replies] == [450, 450, 250]


def test_a_permanent_failure_for_one_of_three_recipients(sink) -> None:
    sink.set_rules([Rule("henry@*", NO_SUCH_USER)])
    rcpts = ["grace@fabrikam.example", "henry@fabrikam.example", "ivan@tailspintoys.example"]
    with connect(sink) as client:
        refused = client.sendmail(SENDER, rcpts, message())
    assert refused == {"henry@fabrikam.example": (550, b"5.1.1 User unknown")}
    assert sink.messages("fabrikam.example")[0]["envelope_to"] == ["grace@fabrikam.example"]
    assert len(sink.messages("tailspintoys.example")) == 1


def test_a_domain_rule_and_the_first_match_wins(sink) -> None:
    sink.add_rule("postmaster@tailspintoys.example", "250 2.1.5 OK")
    sink.add_rule("@tailspintoys.example", "451 4.3.0 Try later")
    with connect(sink) as client:
        refused = client.sendmail(SENDER, ["postmaster@tailspintoys.example", "ivan@tailspintoys.example"],
                                  message())
    assert refused == {"ivan@tailspintoys.example": (451, b"4.3.0 Try later")}
    sink.clear_rules()
    with connect(sink) as client:
        assert client.sendmail(SENDER, ["ivan@tailspintoys.example"], message()) == {}


def test_a_rule_must_be_an_smtp_reply() -> None:
    with pytest.raises(ValueError):
        Rule("x@y", "busy")


def test_drop_after_data_stores_the_message_but_the_client_gets_an_error(sink) -> None:
    sink.set_mode(Mode.DROP_AFTER_DATA, times=1)
    with connect(sink) as client, pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail(SENDER, ["grace@fabrikam.example"], message())
    assert len(sink.messages("fabrikam.example")) == 1
    # The client retries, as it must: SMTP's one duplicate.
    assert sink.mode is Mode.ACCEPT
    with connect(sink) as client:
        client.sendmail(SENDER, ["grace@fabrikam.example"], message())
    assert [m["message_id"] for m in sink.messages("fabrikam.example")] == ["<1@contoso.com>"] * 2
    assert sink.stats().messages == 2


def test_stall_after_data_stores_the_message_and_never_replies(sink) -> None:
    sink.set_mode(Mode.STALL_AFTER_DATA)
    with connect(sink, timeout=0.5) as client, pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
        client.sendmail(SENDER, ["grace@fabrikam.example"], message())
    assert len(sink.messages("fabrikam.example")) == 1


def test_refuse_closes_the_port_and_accept_opens_it_again(sink) -> None:
    port = sink.port
    sink.set_mode("refuse")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(sink.address, timeout=2)
    sink.set_mode("accept")
    assert sink.port == port
    with connect(sink) as client:
        assert client.noop()[0] == 250


def test_a_sink_can_start_refusing(tmp_path) -> None:
    with Sink(tmp_path, mode=Mode.REFUSE) as sink:
        assert sink.port
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(sink.address, timeout=2)


def test_421_at_the_greeting_for_the_next_connection(sink) -> None:
    sink.set_mode(Mode.REJECT_GREETING, times=1)
    with pytest.raises(smtplib.SMTPConnectError) as error:
        connect(sink)
    assert error.value.smtp_code == 421
    with connect(sink) as client:
        assert client.noop()[0] == 250
    assert sink.stats().connections == 2


def test_stall_before_the_greeting(sink) -> None:
    sink.set_mode(Mode.STALL_GREETING)
    with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
        connect(sink, timeout=0.3)
    assert sink.stats().connections == 1


def test_sinks_on_several_loopback_addresses_share_a_port(tmp_path) -> None:
    one = Sink(tmp_path, "127.0.0.2", hostname="mx.fabrikam.example")
    with one, Sink(tmp_path, "127.0.0.3", one.port, hostname="mx.tailspintoys.example") as two:
        one.add_rule("*", "451 4.3.0 Not this one")
        with smtplib.SMTP("127.0.0.3", one.port, timeout=5) as client:
            assert client.ehlo()[1].startswith(b"mx.tailspintoys.example")
            assert client.sendmail(SENDER, ["grace@fabrikam.example"], message()) == {}
        assert (one.stats().connections, two.stats().connections) == (0, 1)


@pytest.fixture(scope="module")
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("sink.mailyard.test", "127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


def test_starttls(tmp_path, tls) -> None:
    server_ctx, client_ctx = tls
    with Sink(tmp_path, tls_context=server_ctx, require_starttls=True) as sink:
        with connect(sink) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail(SENDER, ["grace@fabrikam.example"], message())
            assert refused.value.smtp_code == 530
        with connect(sink) as client:
            client.starttls(context=client_ctx)
            client.sendmail(SENDER, ["grace@fabrikam.example"], message())
        assert sink.messages("fabrikam.example")[0]["tls"] is True


def test_auth_plain_and_login(tmp_path) -> None:
    with Sink(tmp_path, credentials={"relay": "s3cret"}) as sink:
        with connect(sink) as client:
            client.ehlo()
            assert set(client.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail(SENDER, ["grace@fabrikam.example"], message())
            assert refused.value.smtp_code == 530
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("relay", "wrong")
        for mechanism in ("PLAIN", "LOGIN"):
            with connect(sink) as client:
                client.ehlo()
                client.user, client.password = "relay", "s3cret"
                code, _ = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
                assert code == 235
                client.sendmail(SENDER, ["grace@fabrikam.example"], message(mechanism))
        assert [m["auth_user"] for m in sink.messages("fabrikam.example")] == ["relay", "relay"]


def test_auth_is_offered_only_after_starttls_when_tls_is_configured(tmp_path, tls) -> None:
    server_ctx, client_ctx = tls
    with Sink(tmp_path, tls_context=server_ctx, credentials={"relay": "s3cret"}) as sink, connect(sink) as client:
        client.ehlo()
        assert not client.has_extn("auth")
        client.starttls(context=client_ctx)
        client.login("relay", "s3cret")
        client.sendmail(SENDER, ["grace@fabrikam.example"], message())
        assert sink.messages("fabrikam.example")[0]["tls"] is True


def test_no_auth_is_offered_without_credentials(sink) -> None:
    with connect(sink) as client:
        client.ehlo()
        assert not client.has_extn("auth")


def test_a_recipient_domain_cannot_escape_the_folder(sink) -> None:
    with connect(sink) as client, pytest.raises(smtplib.SMTPRecipientsRefused):
        client.sendmail(SENDER, ["x@../etc"], message())


def test_the_async_api_with_aiosmtplib(tmp_path) -> None:
    async def main() -> None:
        async with Sink(tmp_path) as sink:
            async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port, timeout=5) as client:
                for i in range(2):
                    await client.sendmail(SENDER, ["grace@fabrikam.example"], message(f"a{i}"))
            # Changing the mode from inside the sink's own loop takes effect at once too.
            sink.set_mode(Mode.REFUSE)
            with pytest.raises(aiosmtplib.SMTPConnectError):
                await aiosmtplib.SMTP(hostname=sink.host, port=sink.port, timeout=2).connect()
            sink.set_mode(Mode.ACCEPT)
            async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port, timeout=5) as client:
                await client.noop()
            assert sink.stats().transactions == (2, 0)

    asyncio.run(main())
    assert [m["subject"] for m in list_messages(tmp_path, "fabrikam.example")] == ["a0", "a1"]


def test_stop_ends_open_connections(tmp_path) -> None:
    sink = Sink(tmp_path).start()
    client = connect(sink)
    client.ehlo()
    wait_until(lambda: sink.stats().connections == 1, timeout=5)
    sink.stop()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.noop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(sink.address, timeout=2)
