"""Reports to the sender (mailyard.hub.bounce) on the in-memory queues: an NDR or a delay DSN
is a new message from ``<>`` to the original sender, queued in a site's Submission queue as
part of the caller's change, so it is categorized and delivered like any other mail. No
report goes to ``<>``, and none is ever made about a report."""

from __future__ import annotations

import email
from email import policy

import pytest

from mailyard.hub import dsn
from mailyard.hub.bounce import queue_report
from mailyard.hub.memory_queues import MemoryQueues
from mailyard.hub.queues import submission_queue
from mailyard.hub.records import Item, Message
from mailyard.registry import now_ms
from tests.conftest import make_org
from tests.hub.helpers import StaticHub, message

ORIGINAL = b"From: alice@contoso.com\r\nSubject: Plans\r\nMessage-ID: <Plans@test>\r\n\r\nSee you.\r\n"
NOT_FOUND = dsn.Failure("nobody@contoso.com", dsn.RECIP_NOT_FOUND, "nobody@contoso.com")


@pytest.fixture
def hub() -> StaticHub:
    return StaticHub(MemoryQueues(), make_org())


def report(hub: StaticHub, msg: Message, failures: list[dsn.Failure] | None = None, **kw: object) -> str | None:
    """queue_report on a change of its own, committed; the report's message id or None."""
    change = hub.queues.change()
    made = queue_report(hub, change, msg, ORIGINAL, [NOT_FOUND] if failures is None else failures,
                        item_id=hub.queues.new_item_ids(1)[0], now=kw.pop("now", now_ms()), **kw)
    assert hub.queues.commit([change])[0].ok
    return made


def waiting(hub: StaticHub, site: str = "Amsterdam") -> list[Item]:
    queues = hub.queues
    return queues.items(queues.members(submission_queue(site).identity))


def everything_queued(hub: StaticHub) -> list[Item]:
    return [item for q in hub.queues.queues() for item in hub.queues.items(hub.queues.members(q.identity))]


# region: the report


def test_an_ndr_is_a_new_message_from_the_null_sender_to_the_original_sender(hub: StaticHub) -> None:
    msg = message("alice@contoso.com", subject="Plans", now=now_ms())
    made = report(hub, msg)
    (item,) = waiting(hub)
    assert item.msg == made and [r.address for r in item.recipients] == ["alice@contoso.com"]
    ndr = hub.queues.messages([made])[made]
    assert (ndr.sender, ndr.dsn, ndr.source, ndr.origin) == ("", "ndr", "DSN", msg.id), (
        "from <>, marked as a report (so it never gets one), linked to the message it reports on")
    assert ndr.subject == "Undeliverable: Plans" and (ndr.site, ndr.hub) == ("Amsterdam", "HUB-T1")


def test_the_ndr_body_names_each_failed_recipient_and_quotes_the_original_headers(hub: StaticHub) -> None:
    made = report(hub, message(now=now_ms()), [NOT_FOUND, dsn.Failure("x@fabrikam.example", dsn.NO_ROUTE)])
    raw = hub.queues.bodies([made])[made]
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed["From"] == "Postmaster <postmaster@contoso.com>" and parsed["To"] == "alice@contoso.com"
    text = raw.decode()
    assert "nobody@contoso.com" in text and "x@fabrikam.example" in text
    assert "5.1.1" in text and "5.4.4" in text
    assert "Subject: Plans" in text, "the original's header block travels with the report"
    assert hub.queues.messages([made])[made].size == len(raw)


def test_a_delay_dsn_says_delayed_and_is_marked_as_a_delay_report(hub: StaticHub) -> None:
    made = report(hub, message(subject="Plans", now=now_ms()), [dsn.Failure("carol@contoso.com", dsn.DELAYED)],
                  delayed=True)
    delay = hub.queues.messages([made])[made]
    assert (delay.subject, delay.dsn) == ("Delivery delayed: Plans", "delay")
    assert b"Delivery is delayed" in hub.queues.bodies([made])[made]


def test_the_report_expires_like_any_message_received_now(hub: StaticHub) -> None:
    now = now_ms()
    made = report(hub, message(expires_in_ms=1_000, now=now - 10_000), now=now)
    ndr = hub.queues.messages([made])[made]
    assert ndr.received == now
    assert ndr.expires == now + int(hub.settings.message_expiration_timeout * 1000), (
        "the report's own lifetime, not what was left of the original's")


def test_the_report_is_tracked_as_a_dsn_related_to_the_failed_recipients(hub: StaticHub) -> None:
    msg = message(subject="Plans", now=now_ms())
    made = report(hub, msg, [NOT_FOUND, dsn.Failure("carol@contoso.com", dsn.REMOVED)])
    (rec,) = hub.queues.tracked
    assert (rec.event, rec.internal_id, rec.sender, rec.recipients) == ("DSN", made, "", ["alice@contoso.com"])
    assert rec.related == "nobody@contoso.com;carol@contoso.com"
    assert rec.recipient_status == [dsn.RECIP_NOT_FOUND, dsn.REMOVED]
    assert rec.reference == msg.message_id


def test_the_report_asks_for_the_submission_queue_to_be_drained(hub: StaticHub) -> None:
    report(hub, message(now=now_ms()))
    assert hub.queues.drains == ["Amsterdam\\Submission"]


# endregion

# region: where it goes


def test_the_report_enters_the_submission_queue_of_the_hubs_own_site_by_default(hub: StaticHub) -> None:
    london = StaticHub(hub.queues, hub.org, name="HUB-L1", site="London")
    made = report(london, message("erin@contoso.com", now=now_ms(), site="London"))
    assert [i.msg for i in waiting(london, "London")] == [made] and waiting(london, "Amsterdam") == []
    assert hub.queues.messages([made])[made].site == "London"


def test_the_report_enters_the_submission_queue_of_the_site_it_is_given(hub: StaticHub) -> None:
    made = report(hub, message("erin@contoso.com", now=now_ms()), site="London")
    assert [i.msg for i in waiting(hub, "London")] == [made], "e.g. the site of the queue an operator removed from"
    assert waiting(hub, "Amsterdam") == []
    assert hub.queues.messages([made])[made].site == "London"


def test_a_report_to_an_outside_sender_is_queued_the_same_way(hub: StaticHub) -> None:
    made = report(hub, message("grace@fabrikam.example", now=now_ms()))
    (item,) = waiting(hub)
    assert item.msg == made and [r.address for r in item.recipients] == ["grace@fabrikam.example"]


# endregion

# region: when there is none


def test_no_report_is_sent_to_the_null_sender(hub: StaticHub) -> None:
    assert report(hub, message("", now=now_ms())) is None
    assert everything_queued(hub) == [] and hub.queues.tracked == [] and hub.queues.drains == []


@pytest.mark.parametrize("kind", ["ndr", "delay"])
def test_no_report_is_made_about_a_report(hub: StaticHub, kind: str) -> None:
    msg = message("alice@contoso.com", now=now_ms())
    msg.dsn = kind
    assert report(hub, msg) is None
    assert everything_queued(hub) == [] and hub.queues.tracked == []


def test_no_report_without_a_failure(hub: StaticHub) -> None:
    assert report(hub, message(now=now_ms()), []) is None
    assert everything_queued(hub) == []


def test_a_report_of_a_change_that_is_refused_never_exists(hub: StaticHub) -> None:
    msg = message(now=now_ms())
    change = hub.queues.change().require_first("already-seen")
    hub.queues.commit([hub.queues.change().remember("already-seen", "m0", 60)])
    made = queue_report(hub, change, msg, ORIGINAL, [NOT_FOUND], item_id=hub.queues.new_item_ids(1)[0],
                        now=now_ms())
    assert made is not None, "the report was added to the change"
    assert not hub.queues.commit([change])[0].ok
    assert everything_queued(hub) == [] and hub.queues.messages([made]) == {}, (
        "the report is part of the caller's change: refused with it")


# endregion
