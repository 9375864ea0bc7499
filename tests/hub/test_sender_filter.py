"""Sender filtering's rules (mailyard.hub.sender_filter)."""

from __future__ import annotations

from mailyard.hub import sender_filter
from mailyard.org import AntispamSettings

SETTINGS = AntispamSettings(blocked_senders=["spam@fabrikam.example"], blocked_domains=["junk.example"],
                            blocked_domains_and_subdomains=["spammy.example"])


def test_blocked_senders_domains_and_subdomains() -> None:
    assert sender_filter.refusal(SETTINGS, "Spam@Fabrikam.Example"), "any case"
    assert sender_filter.refusal(SETTINGS, "anyone@junk.example")
    assert sender_filter.refusal(SETTINGS, "anyone@mail.junk.example") is None, "only the domain itself"
    assert sender_filter.refusal(SETTINGS, "a@spammy.example") and sender_filter.refusal(SETTINGS, "a@x.spammy.example")
    assert sender_filter.refusal(SETTINGS, "a@notspammy.example") is None
    assert sender_filter.refusal(SETTINGS, "carol@fabrikam.example") is None


def test_the_null_sender_only_with_blank_sender_blocking() -> None:
    assert sender_filter.refusal(SETTINGS, "") is None
    assert sender_filter.refusal(SETTINGS.model_copy(update={"blank_sender_blocking": True}), "")
