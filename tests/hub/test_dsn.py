"""RFC 3464 reports, as the standard library parses them (pure logic)."""

from __future__ import annotations

import email
from email import policy

from mailyard.hub import dsn
from mailyard.hub.retry import queue_retry_delay
from mailyard.org import TransportSettings

ORIGINAL = b"From: a@t.example\r\nTo: b@t.example\r\nSubject: Hello\r\nMessage-ID: <m1@t>\r\n\r\nbody\r\n"


def build(delayed: bool = False) -> email.message.Message:
    raw, message_id = dsn.build(
        delayed=delayed, reporting_mta="hub.t.example", postmaster="postmaster@t.example",
        recipient="a@t.example", original=ORIGINAL, original_subject="Hello", original_message_id="<m1@t>",
        arrival="Thu, 26 Nov 2026 10:00:00 +0000",
        failures=[dsn.Failure("x@t.example", dsn.RECIP_NOT_FOUND, "alias@t.example"),
                  dsn.Failure("y@r.example", "550 5.2.2 mailbox full", remote_mta="mx.r.example")],
    )
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert msg["Message-ID"] == message_id
    return msg


def test_an_ndr_is_a_multipart_report_with_one_block_per_failed_recipient() -> None:
    msg = build()
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "delivery-status"
    assert msg["Subject"] == "Undeliverable: Hello" and msg["In-Reply-To"] == "<m1@t>"
    assert msg["Auto-Submitted"] == "auto-replied"
    kinds = [p.get_content_type() for p in msg.iter_parts()]
    assert kinds == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    blocks = list(msg.iter_parts())[1].get_payload()
    assert blocks[0]["Reporting-MTA"] == "dns; hub.t.example"
    first, second = blocks[1], blocks[2]
    assert (first["Final-Recipient"], first["Original-Recipient"], first["Status"], first["Action"]) == (
        "rfc822; x@t.example", "rfc822; alias@t.example", "5.1.1", "failed")
    assert second["Status"] == "5.2.2" and second["Remote-MTA"] == "dns; mx.r.example"
    text = list(msg.iter_parts())[0].get_content()
    assert "Diagnostic information for administrators" in text and "Generating server: hub.t.example" in text


def test_a_delay_dsn_says_delayed() -> None:
    msg = build(delayed=True)
    assert msg["Subject"] == "Delivery delayed: Hello"
    assert all(b["Action"] == "delayed" for b in list(msg.iter_parts())[1].get_payload()[1:])


def test_the_exchange_retry_schedule_glitch_then_transient_then_outbound_failure() -> None:
    s = TransportSettings()
    delays = [queue_retry_delay(s, n) for n in range(1, 13)]
    assert delays == [60] * 4 + [300] * 6 + [600] * 2
