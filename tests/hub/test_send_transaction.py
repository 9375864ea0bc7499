"""One transaction out (``hub/send_transaction.py``) over real sockets, to SMTP sinks that
offer PIPELINING and to sinks that do not: the same outcome per recipient either way, and
pipelined, one write for the commands and one for the message."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest

from mailyard.hub.send_transaction import MAX_GROUP, Transaction, transaction
from mailyard.internet.sink import MAILBOX_BUSY, NO_SUCH_USER, Rule, Sink

BODY = b"From: a@contoso.com\r\nSubject: out\r\n\r\n.a leading dot\r\nbare\nLF\r\n"
RULES = [Rule("gone@*", NO_SUCH_USER), Rule("busy@*", MAILBOX_BUSY)]


@pytest.fixture(params=[True, False], ids=["pipelined", "lock-step"])
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sink]:
    with Sink(tmp_path / "sink", rules=RULES, pipelining=request.param, data_size_limit=20_000) as s:
        yield s


def send(sink: Sink, *messages: tuple[list[str], bytes]) -> tuple[list[Transaction], list[bytes]]:
    """Each message in turn over one connection (RSET after one left open), as send._send_jobs
    does; what became of each, and every write the client made after EHLO."""
    async def run() -> tuple[list[Transaction], list[bytes]]:
        smtp = aiosmtplib.SMTP(hostname=sink.host, port=sink.port, timeout=10, start_tls=False)
        await smtp.connect()
        await smtp.ehlo()
        assert smtp.supports_extension("pipelining") == sink.pipelining
        assert smtp.protocol is not None
        writes: list[bytes] = []
        write = smtp.protocol.write
        smtp.protocol.write = lambda data: (writes.append(data), write(data))[1]  # type: ignore[method-assign]
        done, open_ = [], False
        for recipients, body in messages:
            done.append(await transaction(smtp, "a@contoso.com", recipients, body, [], rset=open_, timeout=10))
            open_ = done[-1].open
        await smtp.quit()
        return done, writes
    return asyncio.run(run())


def outcome(t: Transaction) -> dict[str, str]:
    return {rcpt: f"{r.code} {r.message}" for rcpt, r in t.replies.items()}


def test_each_recipient_gets_its_own_outcome(sink: Sink) -> None:
    rcpts = ["ann@x.example", "gone@x.example", "busy@x.example", "bob@x.example"]
    (done,), writes = send(sink, (rcpts, BODY))
    assert outcome(done) == {"ann@x.example": "250 2.6.0 Queued mail for delivery", "gone@x.example": NO_SUCH_USER,
                             "busy@x.example": MAILBOX_BUSY, "bob@x.example": "250 2.6.0 Queued mail for delivery"}
    assert not done.open
    (stored,) = sink.messages("x.example")
    assert stored["envelope_to"] == ["ann@x.example", "bob@x.example"]
    assert Path(stored["file"]).read_bytes().endswith(b"\r\n.a leading dot\r\nbare\r\nLF\r\n"), "as aiosmtplib sends"
    assert len(writes) == (2 if sink.pipelining else 1 + len(rcpts) + 2) + 1, writes  # (+ QUIT)


def test_no_recipient_taken_leaves_the_transaction_open_and_rset_goes_with_the_next(sink: Sink) -> None:
    (refused, taken), writes = send(sink, (["gone@x.example", "busy@x.example"], BODY), (["ann@x.example"], BODY))
    assert outcome(refused) == {"gone@x.example": NO_SUCH_USER, "busy@x.example": MAILBOX_BUSY}
    assert refused.open and outcome(taken) == {"ann@x.example": "250 2.6.0 Queued mail for delivery"}
    assert len(sink.messages("x.example")) == 1
    if sink.pipelining:  # RSET, MAIL, both RCPTs and DATA; then RSET, MAIL, RCPT, DATA; the message
        assert [w.count(b"\r\n") for w in writes[:2]] == [4, 4] and writes[1].startswith(b"RSET\r\nMAIL FROM:")


def test_a_refused_sender_is_every_recipients_outcome(tmp_path: Path) -> None:
    for pipelining in (True, False):
        with Sink(tmp_path / str(pipelining), credentials={"u": "p"}, pipelining=pipelining) as sink:
            (done,), _ = send(sink, (["ann@x.example", "bob@x.example"], BODY))
        assert outcome(done) == dict.fromkeys(["ann@x.example", "bob@x.example"], "530 5.7.0 Authentication required")
        assert not done.open and not sink.messages("x.example")


def test_a_message_refused_after_its_end_is_the_outcome_of_the_recipients_taken(sink: Sink) -> None:
    (done, after), _ = send(sink, (["ann@x.example", "gone@x.example"], BODY * 1000), (["bob@x.example"], BODY))
    assert outcome(done) == {"ann@x.example": "552 Error: Too much mail data", "gone@x.example": NO_SUCH_USER}
    assert done.open and outcome(after) == {"bob@x.example": "250 2.6.0 Queued mail for delivery"}


def test_more_recipients_than_one_group_holds(sink: Sink) -> None:
    rcpts = [f"r{i}@x.example" for i in range(250)] + ["gone@x.example"]
    (done,), writes = send(sink, (rcpts, BODY))
    assert outcome(done) == {**dict.fromkeys(rcpts[:-1], "250 2.6.0 Queued mail for delivery"),
                             "gone@x.example": NO_SUCH_USER}
    if sink.pipelining:  # MAIL, 251 RCPTs, DATA in groups of MAX_GROUP; the message; QUIT
        assert len(writes) == -(-253 // MAX_GROUP) + 2
