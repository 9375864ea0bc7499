"""The directory (mailyard.directory): how the categorizer and the receive connectors resolve
an envelope recipient. Aliases become their primary address, groups expand to their members
(nested groups recursively, loops included), each final recipient appears once, contacts
lead outside the organization, and an unknown address is unknown only in an accepted domain.

The organization is the demo's (deploy/contoso.toml): Alice (alias a.anders) and Bob on
MBX-AMS-01, Carol and Dave on MBX-AMS-02 (Amsterdam), Erin and Frank on MBX-LON-01 (London);
the group all-staff nests amsterdam-team; Grace of Fabrikam is a contact.
"""

from __future__ import annotations

import pytest

from mailyard.directory import Directory, Final, Kind
from mailyard.org import Contact, Group, Organization
from tests.conftest import make_org


@pytest.fixture(scope="module")
def contoso() -> Organization:
    return make_org()


@pytest.fixture(scope="module")
def directory(contoso: Organization) -> Directory:
    return Directory(contoso)


def addresses(finals: list[Final]) -> list[str]:
    return [f.address for f in finals]


def with_groups(org: Organization, *groups: Group) -> Directory:
    return Directory(org.model_copy(update={"groups": [*org.groups, *groups]}))


# region: mailboxes and aliases


def test_a_primary_address_resolves_to_its_mailbox_with_its_server_and_site(directory: Directory) -> None:
    out = directory.expand(["carol@contoso.com"])
    assert out.finals == [Final("carol@contoso.com", Kind.MAILBOX, "carol@contoso.com", "MBX-AMS-02", "Amsterdam")]
    assert out.resolved == [] and out.expanded == [] and out.unknown == []


def test_an_alias_resolves_to_the_primary_address_and_is_recorded_for_the_tracking_log(
        directory: Directory) -> None:
    out = directory.expand(["a.anders@contoso.com"])
    (alice,) = out.finals
    assert (alice.address, alice.server, alice.site) == ("alice@contoso.com", "MBX-AMS-01", "Amsterdam")
    assert alice.original == "a.anders@contoso.com", "the original recipient (ORCPT) is the address as written"
    assert out.resolved == [("a.anders@contoso.com", "alice@contoso.com")], "one RESOLVE event: alias -> primary"


def test_addresses_are_matched_without_regard_to_case(directory: Directory) -> None:
    out = directory.expand(["Bob@CONTOSO.com", "E.Evans@Contoso.Com"])
    assert addresses(out.finals) == ["bob@contoso.com", "erin@contoso.com"]
    assert out.finals[0].original == "bob@contoso.com", "the original is kept lower-cased"


def test_a_mailbox_named_by_its_address_and_by_its_alias_is_one_final_recipient(directory: Directory) -> None:
    out = directory.expand(["alice@contoso.com", "a.anders@contoso.com", "ALICE@contoso.com"])
    assert addresses(out.finals) == ["alice@contoso.com"]
    assert out.finals[0].original == "alice@contoso.com", "the first mention is the one kept"


def test_final_recipients_keep_the_order_of_their_first_mention(directory: Directory) -> None:
    out = directory.expand(["frank@contoso.com", "bob@contoso.com", "dave@contoso.com", "bob@contoso.com"])
    assert addresses(out.finals) == ["frank@contoso.com", "bob@contoso.com", "dave@contoso.com"]


def test_a_mailbox_of_another_site_carries_that_site(directory: Directory) -> None:
    (erin,) = directory.expand(["erin@contoso.com"]).finals
    assert (erin.server, erin.site) == ("MBX-LON-01", "London")


# endregion

# region: groups


def test_a_group_expands_to_its_members_who_each_carry_the_group_as_their_original(
        directory: Directory) -> None:
    out = directory.expand(["amsterdam-team@contoso.com"])
    assert addresses(out.finals) == ["alice@contoso.com", "bob@contoso.com", "carol@contoso.com", "dave@contoso.com"]
    assert {f.original for f in out.finals} == {"amsterdam-team@contoso.com"}
    assert out.expanded == [("amsterdam-team@contoso.com", addresses(out.finals))], "one EXPAND event"
    assert all(f.kind is Kind.MAILBOX for f in out.finals), "the group itself is never a final recipient"


def test_nested_groups_expand_recursively_and_each_final_recipient_appears_once(directory: Directory) -> None:
    # all-staff = [amsterdam-team, erin, frank, alice]; amsterdam-team = [alice, bob, carol, dave]
    out = directory.expand(["all-staff@contoso.com", "bob@contoso.com"])
    assert addresses(out.finals) == ["alice@contoso.com", "bob@contoso.com", "carol@contoso.com",
                                     "dave@contoso.com", "erin@contoso.com", "frank@contoso.com"]
    assert [group for group, _ in out.expanded] == ["all-staff@contoso.com", "amsterdam-team@contoso.com"]
    alice = out.finals[0]
    assert alice.original == "amsterdam-team@contoso.com", "reached first through the nested group"


def test_a_group_named_twice_is_expanded_once(directory: Directory) -> None:
    out = directory.expand(["amsterdam-team@contoso.com", "all-staff@contoso.com", "amsterdam-team@contoso.com"])
    assert [group for group, _ in out.expanded] == ["amsterdam-team@contoso.com", "all-staff@contoso.com"]
    assert len(out.finals) == len(set(addresses(out.finals))) == 6


def test_a_group_that_contains_itself_is_expanded_once_and_the_loop_ends_there(contoso: Organization) -> None:
    directory = with_groups(contoso, Group(address="selfish@contoso.com",
                                           members=["selfish@contoso.com", "bob@contoso.com"]))
    out = directory.expand(["selfish@contoso.com"])
    assert addresses(out.finals) == ["bob@contoso.com"]
    assert out.expanded == [("selfish@contoso.com", ["selfish@contoso.com", "bob@contoso.com"])]


def test_groups_that_contain_each_other_expand_each_member_once(contoso: Organization) -> None:
    directory = with_groups(
        contoso,
        Group(address="ping@contoso.com", members=["pong@contoso.com", "bob@contoso.com"]),
        Group(address="pong@contoso.com", members=["ping@contoso.com", "carol@contoso.com", "bob@contoso.com"]),
    )
    for start in ("ping@contoso.com", "pong@contoso.com"):
        out = directory.expand([start])
        assert sorted(addresses(out.finals)) == ["bob@contoso.com", "carol@contoso.com"], start
        assert len(out.expanded) == 2, f"from {start}: each group of the loop expanded exactly once"


def test_an_empty_group_expands_to_no_recipient(contoso: Organization) -> None:
    out = with_groups(contoso, Group(address="nobody-yet@contoso.com")).expand(["nobody-yet@contoso.com"])
    assert out.finals == [] and out.unknown == []
    assert out.expanded == [("nobody-yet@contoso.com", [])]


# endregion

# region: contacts, external and unknown addresses


def test_a_contacts_address_in_the_organization_leads_to_its_external_address(directory: Directory) -> None:
    (grace,) = directory.expand(["grace.fabrikam@contoso.com"]).finals
    assert (grace.address, grace.kind) == ("grace@fabrikam.example", Kind.CONTACT)
    assert (grace.server, grace.site) == (None, None), "a contact has no mailbox server"
    assert grace.original == "grace.fabrikam@contoso.com"


def test_a_contacts_external_address_is_the_same_contact(directory: Directory) -> None:
    out = directory.expand(["grace.fabrikam@contoso.com", "grace@fabrikam.example"])
    assert [(f.address, f.kind) for f in out.finals] == [("grace@fabrikam.example", Kind.CONTACT)]


def test_a_contact_may_be_a_group_member(contoso: Organization) -> None:
    directory = with_groups(contoso, Group(address="partners@contoso.com", members=["grace@fabrikam.example"]))
    (grace,) = directory.expand(["partners@contoso.com"]).finals
    assert (grace.address, grace.kind, grace.original) == ("grace@fabrikam.example", Kind.CONTACT,
                                                           "partners@contoso.com")


def test_an_address_outside_the_accepted_domains_is_an_external_recipient(directory: Directory) -> None:
    (ext,) = directory.expand(["Heidi@Tailspintoys.Example"]).finals
    assert (ext.address, ext.kind, ext.server, ext.site) == ("heidi@tailspintoys.example", Kind.EXTERNAL, None, None)
    assert directory.expand(["heidi@tailspintoys.example"]).unknown == [], "external is never unknown"


def test_an_unknown_address_in_an_accepted_domain_is_unknown_once_and_never_a_final_recipient(
        directory: Directory) -> None:
    out = directory.expand(["nobody@contoso.com", "bob@contoso.com", "NOBODY@contoso.com"])
    assert out.unknown == ["nobody@contoso.com"], "reported once (one NDR 5.1.1), lower-cased"
    assert addresses(out.finals) == ["bob@contoso.com"], "the other recipients go on"


def test_a_subdomain_of_an_accepted_domain_is_not_accepted(directory: Directory) -> None:
    assert directory.is_accepted("bob@contoso.com")
    assert directory.is_accepted("bob@CONTOSO.COM."), "case and a trailing dot do not matter"
    assert not directory.is_accepted("bob@eu.contoso.com")
    assert not directory.is_accepted("bob@notcontoso.com")
    (ext,) = directory.expand(["bob@eu.contoso.com"]).finals
    assert ext.kind is Kind.EXTERNAL


# endregion

# region: lookups


def test_lookup_finds_mailboxes_groups_and_contacts_and_nothing_else(directory: Directory) -> None:
    assert directory.lookup("a.anders@contoso.com").address == "alice@contoso.com"
    assert directory.lookup("all-staff@contoso.com").kind is Kind.GROUP
    assert directory.lookup("grace@fabrikam.example").kind is Kind.CONTACT
    assert directory.lookup("nobody@contoso.com") is None
    assert directory.lookup("heidi@tailspintoys.example") is None, "an outside address is no directory object"


def test_mailbox_entry_is_only_for_mailboxes(directory: Directory) -> None:
    assert directory.mailbox_entry("E.EVANS@contoso.com").server == "MBX-LON-01"
    assert directory.mailbox_entry("all-staff@contoso.com") is None
    assert directory.mailbox_entry("grace.fabrikam@contoso.com") is None


def test_the_servers_of_a_site_are_those_the_organization_puts_there(directory: Directory) -> None:
    assert sorted(directory.servers_in_site("Amsterdam")) == ["MBX-AMS-01", "MBX-AMS-02"]
    assert directory.servers_in_site("London") == ["MBX-LON-01"]
    assert directory.servers_in_site("Paris") == []


def test_password_hashes_are_indexed_by_primary_address_for_mailboxes_that_have_one(
        contoso: Organization) -> None:
    mailboxes = [mb if mb.address != "dave@contoso.com" else mb.model_copy(update={"password": ""})
                 for mb in contoso.mailboxes]
    directory = Directory(contoso.model_copy(update={"mailboxes": mailboxes}))
    assert "alice@contoso.com" in directory.password_hashes
    assert "a.anders@contoso.com" not in directory.password_hashes, "aliases do not log on"
    assert "dave@contoso.com" not in directory.password_hashes


def test_a_new_contact_is_found_by_both_its_addresses(contoso: Organization) -> None:
    contact = Contact(external_address="ivan@wingtiptoys.example", address="ivan.wingtip@contoso.com")
    directory = Directory(contoso.model_copy(update={"contacts": [*contoso.contacts, contact]}))
    assert directory.lookup("ivan.wingtip@contoso.com") == directory.lookup("ivan@wingtiptoys.example")


# endregion
