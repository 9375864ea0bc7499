"""Connection filtering's rules (mailyard.hub.connection_filter): the IP lists, the RFC 5782
query name, which answers count as a listing, and the operator's reply text."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mailyard.hub import connection_filter as cf
from mailyard.org import AntispamSettings, BlockListProvider

LIST = BlockListProvider(name="List", lookup_domain="bl.example")


def test_the_query_reverses_the_octets_under_the_lookup_domain() -> None:
    assert cf.query_name("192.0.2.99", LIST) == "99.2.0.192.bl.example."
    assert cf.query_name("2001:db8::1", LIST) is None, "IPv6 clients are not looked up (as Exchange)"
    assert cf.query_name("not an ip", LIST) is None


@pytest.mark.parametrize(("answer", "provider", "listed"), [
    ("127.0.0.2", LIST, True),
    ("127.255.255.254", LIST, False),  # an error code (a public resolver), not a listing
    ("10.0.0.2", LIST, False),  # outside 127.0.0.0/8
    ("127.0.0.4", LIST.model_copy(update={"bitmask": 2}), False),
    ("127.0.0.6", LIST.model_copy(update={"bitmask": 2}), True),
    ("127.0.0.4", LIST.model_copy(update={"addresses": ["127.0.0.2", "127.0.0.4"]}), True),
    ("127.0.0.5", LIST.model_copy(update={"addresses": ["127.0.0.2"]}), False),
])
def test_which_answers_are_listings(answer: str, provider: BlockListProvider, listed: bool) -> None:
    assert cf.is_listing(answer, provider) is listed


def test_the_ip_lists_take_ranges_and_single_addresses() -> None:
    settings = AntispamSettings(ip_allow_list=["10.0.0.0/8"], ip_block_list=["192.0.2.1-192.0.2.9", "2001:db8::1"])
    assert cf.allowed(settings, "10.1.2.3") and not cf.allowed(settings, "11.0.0.1")
    assert cf.blocked_reply(settings, "192.0.2.5") == (
        "550 5.7.1 External client with IP address 192.0.2.5 does not have permissions to submit to this server.")
    assert cf.blocked_reply(settings, "2001:db8::1") is not None
    assert cf.blocked_reply(settings, "192.0.2.10") is None


def test_the_reply_is_the_operators_text_with_its_placeholders() -> None:
    assert cf.listed_reply(LIST, "192.0.2.1") == "550 5.7.1 Recipient not authorized, your IP has been found on a block list"
    own = LIST.model_copy(update={"rejection_response": "{0} is on {1} ({2})"})
    assert cf.listed_reply(own, "192.0.2.1") == "550 5.7.1 192.0.2.1 is on List (bl.example)"


@pytest.mark.parametrize("text", ["{3} is listed", "{name}", "two\r\nlines", "{"])
def test_a_reply_text_that_cannot_be_sent_is_refused_when_the_file_is_read(text: str) -> None:
    with pytest.raises(ValidationError):
        BlockListProvider(name="List", lookup_domain="bl.example", rejection_response=text)
