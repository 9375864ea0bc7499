"""What crosses to an Edge (mailyard.edgesync): which recipients, as what, and the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailyard import edgesync
from mailyard.errors import SiteError
from mailyard.org import Group, Mailbox, Organization, Site


def org() -> Organization:
    return Organization(
        accepted_domains=["contoso.com"], sites=[Site(name="Amsterdam", mailbox_servers=["MBX-1"])],
        mailboxes=[Mailbox(address="bob@contoso.com", aliases=["robert@contoso.com"], server="MBX-1")],
        groups=[Group(address="open@contoso.com", members=["bob@contoso.com", "closed@contoso.com"],
                      require_sender_authentication=False),
                Group(address="closed@contoso.com", members=["bob@contoso.com"]),
                Group(address="public@contoso.com", members=["bob@contoso.com"], require_sender_authentication=False)])


def test_recipients_are_mailboxes_aliases_and_open_groups_that_nest_no_closed_one() -> None:
    assert edgesync.external_recipients(org()) == {"bob@contoso.com", "robert@contoso.com", "public@contoso.com"}
    assert edgesync.closed_groups(org()) == {"open@contoso.com", "closed@contoso.com"}


def test_recipients_cross_as_salted_hashes_of_the_canonical_address() -> None:
    push = edgesync.recipients_push(org(), "salt")
    assert edgesync.recipient_hash("salt", "Bob@CONTOSO.com") in push.hashes
    assert edgesync.recipient_hash("other", "bob@contoso.com") not in push.hashes
    assert not any("contoso" in h for h in push.hashes + push.closed)


def test_a_file_that_is_not_a_subscription_says_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    for text, expected in (("{", "not JSON"), ("[]", "is not an Edge subscription file"),
                           (json.dumps({"format": edgesync.FORMAT}), "edge: Field required")):
        path.write_text(text)
        with pytest.raises(SiteError, match=expected):
            edgesync.read_subscription(path)
    with pytest.raises(SiteError, match="cannot read"):
        edgesync.read_subscription(tmp_path / "missing.json")
