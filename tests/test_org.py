"""The organization file: validated on load, every problem named by key and line."""

from __future__ import annotations

import textwrap

import pytest

from mailyard.directory import Directory, Kind
from mailyard.errors import ConfigError
from mailyard.org import load_org, parse_org
from tests.conftest import CONTOSO

MINIMAL = """
name = "T"
accepted_domains = ["t.example"]
[[sites]]
name = "S"
mailbox_servers = ["M1"]
[[mailboxes]]
address = "a@t.example"
server = "M1"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_org(textwrap.dedent(text), source="org.toml")
    return [str(p) for p in info.value.problems]


def test_the_demo_organization_is_valid_and_has_what_the_demo_needs() -> None:
    org = load_org(CONTOSO)
    assert [s.name for s in org.sites] == ["Amsterdam", "London"]
    servers = {s.name: s.mailbox_servers for s in org.sites}
    assert len(servers["Amsterdam"]) == 2 and len(servers["London"]) == 1
    used = {m.server for m in org.mailboxes}
    assert used == {"MBX-AMS-01", "MBX-AMS-02", "MBX-LON-01"} and len(org.mailboxes) >= 6
    nested = {g.address for g in org.groups} & {m for g in org.groups for m in g.members}
    assert nested, "the demo needs a group inside a group"
    assert org.contacts


def test_exchange_2010_defaults_apply_to_keys_left_out() -> None:
    t = parse_org(MINIMAL).transport
    assert t.message_expiration_timeout == 2 * 86400
    assert t.delay_notification_timeout == 4 * 3600
    assert (t.queue_glitch_retry_count, t.queue_glitch_retry_interval) == (4, 60)
    assert (t.transient_failure_retry_count, t.transient_failure_retry_interval) == (6, 300)
    assert t.outbound_connection_failure_retry_interval == 600
    assert t.max_message_size == 10 * 1024 * 1024
    assert t.max_per_domain_outbound_connections == 20
    assert t.poison_threshold == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + '[transport]\nmessage_expiration_timeout = "soon"\n',
         "line 11: transport.message_expiration_timeout: 'soon' is not a duration"),
        (MINIMAL + '[transport]\nmax_message_size = "ten"\n', "transport.max_message_size: 'ten' is not a size"),
        (MINIMAL + "[transport]\npoison_threshold = 0\n", "transport.poison_threshold"),
        (MINIMAL.replace('server = "M1"', 'server = "M1"\ncolour = "red"'),
         "line 10: mailboxes[0].colour: unknown key"),
        (MINIMAL.replace("a@t.example", "not-an-address"),
         "line 8: mailboxes[0].address: 'not-an-address' is not a valid e-mail address"),
        (MINIMAL.replace('server = "M1"', 'server = "M9"'), "line 9: mailboxes[0].server: no mailbox server named 'M9'"),
        (MINIMAL.replace("a@t.example", "a@elsewhere.example"), "is not in an accepted domain"),
        (MINIMAL + '[[groups]]\naddress = "g@t.example"\nmembers = ["ghost@t.example"]\n',
         "groups[0].members[0]: ghost@t.example is not a mailbox, group or contact"),
        (MINIMAL + '[[mailboxes]]\naddress = "A@t.example"\nserver = "M1"\n', "a@t.example is already used"),
        (MINIMAL + '[[send_connectors]]\nname = "X"\naddress_spaces = ["SMTP:*contoso.com;1"]\n',
         "send_connectors[0].address_spaces[0]"),
        (MINIMAL + '[[send_connectors]]\nname = "X"\naddress_spaces = ["*"]\ndns_routing = false\n',
         "send_connectors[0].smart_hosts: needs smart hosts"),
        (MINIMAL + '[[receive_connectors]]\nname = "R"\nbindings = ["localhost"]\n',
         "receive_connectors[0].bindings"),
        (MINIMAL + '[[receive_connectors]]\nname = "R"\npermission_groups = ["Everyone"]\n',
         "receive_connectors[0].permission_groups[0]"),
        (MINIMAL + '[[receive_connectors]]\nname = "R"\nauth_mechanisms = ["ExternalAuthoritative"]\n'
         'permission_groups = ["AnonymousUsers"]\n',
         "receive_connectors[0].auth_mechanisms: ExternalAuthoritative needs the ExchangeServers permission group"),
        (MINIMAL + '[[address_rewrites]]\nname = "W"\ninternal_address = "*.t.example"\nexternal_address = "t.example"\n',
         "address_rewrites[0].outbound_only: must be true for a *.domain entry"),
        (MINIMAL + '[[address_rewrites]]\nname = "A"\ninternal_address = "a@t.example"\nexternal_address = "t.example"\n',
         "address_rewrites[0].external_address: must be an address when internal_address is one"),
        (MINIMAL + '[[address_rewrites]]\nname = "A"\ninternal_address = "a@t.example"\n'
         'external_address = "a@elsewhere.example"\n', "elsewhere.example is not an accepted domain"),
        (MINIMAL + '[[address_rewrites]]\nname = "W"\ninternal_address = "*.t.example"\nexternal_address = "t.example"\n'
         'outbound_only = true\nexception_list = ["other.example"]\n',
         "address_rewrites[0].exception_list[0]: other.example is not a subdomain of t.example"),
        (MINIMAL + '[[address_rewrites]]\nname = "A"\ninternal_address = "a@t.example"\nexternal_address = "b@t.example"\n'
         '[[address_rewrites]]\nname = "B"\ninternal_address = "A@T.example"\nexternal_address = "c@t.example"\n',
         "address_rewrites[1].internal_address: a@t.example is already rewritten by 'A'"),
        (MINIMAL + '[[address_rewrites]]\nname = "A"\ninternal_address = "not an address"\nexternal_address = "t.example"\n',
         "address_rewrites[0].internal_address: 'not an address' is not a valid domain name"),
        ('accepted_domains = ["t.example"]\nsites = []\n', "sites: List should have at least 1 item"),
        ("name = \n", "line 1: (syntax)"),
    ],
)
def test_a_bad_file_gets_an_error_naming_the_key_and_what_is_wrong(text: str, expected: str) -> None:
    found = problems(text)
    assert any(expected in p for p in found), f"expected {expected!r} in {found}"


def test_the_error_names_the_file(tmp_path) -> None:
    path = tmp_path / "org.toml"
    path.write_text(MINIMAL.replace('server = "M1"', 'server = "M9"'))
    with pytest.raises(ConfigError, match=r"org\.toml: line 9: mailboxes\[0\]\.server"):
        load_org(path)


def test_a_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_org(tmp_path / "missing.toml")


# region: the directory (pure logic)


def directory() -> Directory:
    return Directory(load_org(CONTOSO))


def test_aliases_resolve_to_the_primary_address_case_insensitively() -> None:
    out = directory().expand(["C.Claes@Contoso.com"])
    assert [f.address for f in out.finals] == ["carol@contoso.com"]
    assert out.resolved == [("c.claes@contoso.com", "carol@contoso.com")]
    assert out.finals[0].server == "MBX-AMS-02" and out.finals[0].site == "Amsterdam"


def test_nested_groups_expand_recursively_and_each_member_appears_once() -> None:
    out = directory().expand(["all-staff@contoso.com", "alice@contoso.com"])
    addresses = [f.address for f in out.finals]
    assert sorted(addresses) == sorted({"alice@contoso.com", "bob@contoso.com", "carol@contoso.com",
                                        "dave@contoso.com", "erin@contoso.com", "frank@contoso.com"})
    assert len(addresses) == len(set(addresses))
    assert {g for g, _ in out.expanded} == {"all-staff@contoso.com", "amsterdam-team@contoso.com"}


def test_a_group_loop_ends() -> None:
    text = MINIMAL + textwrap.dedent("""
        [[groups]]
        address = "x@t.example"
        members = ["y@t.example", "a@t.example"]
        [[groups]]
        address = "y@t.example"
        members = ["x@t.example", "y@t.example"]
    """)
    out = Directory(parse_org(text)).expand(["x@t.example", "y@t.example"])
    assert [f.address for f in out.finals] == ["a@t.example"]


def test_contacts_route_to_their_external_address_and_unknowns_are_reported() -> None:
    out = directory().expand(["grace.fabrikam@contoso.com", "nobody@contoso.com", "someone@example.org"])
    kinds = {f.address: f.kind for f in out.finals}
    assert kinds == {"grace@fabrikam.example": Kind.CONTACT, "someone@example.org": Kind.EXTERNAL}
    assert out.unknown == ["nobody@contoso.com"]

# endregion


@pytest.mark.parametrize(("old", "new", "expected"), [
    ('mailbox_servers = ["MBX-LON-01"]', 'mailbox_servers = ["MBX-LON-01", "mbx_lon_01"]',
     "'mbx_lon_01' and 'MBX-LON-01' would share one certificate identity (mbx-lon-01)"),
    ('name = "London"\nmailbox_servers', 'name = "amsterdam"\nmailbox_servers',
     "'amsterdam' and 'Amsterdam' would share one certificate identity"),
    ('mailbox_servers = ["MBX-LON-01"]', 'mailbox_servers = ["MBX-LON-01", "' + "M" * 64 + '"]',
     "cannot name a certificate"),
])
def test_names_that_would_share_a_certificate_identity_are_refused(old: str, new: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_org(CONTOSO.read_text().replace(old, new))
    assert expected in str(info.value)


@pytest.mark.parametrize("field", ["full_access", "send_as", "send_on_behalf"])
def test_a_grant_names_a_mailbox_or_an_operator_of_the_organization(field: str) -> None:
    text = CONTOSO.read_text().replace(f"{field} = []", f'{field} = ["mallory@contoso.com"]', 1)
    with pytest.raises(ConfigError) as info:
        parse_org(text)
    assert f"mailboxes[1].{field}[0]" in str(info.value) and "is not a mailbox" in str(info.value)
    assert parse_org(CONTOSO.read_text().replace(f"{field} = []", f'{field} = ["Alice@Contoso.com", "operator"]', 1))
