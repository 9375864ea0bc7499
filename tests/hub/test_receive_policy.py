"""The receive connectors' decisions, without a socket: which connector a client gets, what it
offers, who logs on, who may send and relay, and the limits. The demo organization's
connectors: ``Default`` (the organization's network: users and hubs, no anonymous mail),
``Internet`` (everyone else: anonymous mail for contoso.com only), ``Client`` (port 587,
users after logging on)."""

from __future__ import annotations

import pytest

from mailyard import pki
from mailyard.directory import Directory
from mailyard.hub import replies
from mailyard.hub.pressure import Level
from mailyard.hub.receive_policy import (
    Identity,
    Refused,
    authzid_refused,
    certificate_logon,
    check_hops,
    connectors_for,
    granted_groups,
    header_senders_refusal,
    is_error,
    is_internal,
    logon,
    mail_from,
    pressure_refusal,
    rcpt_to,
    receive_connector_for,
    relay_origin,
    session_rules,
    size_limit,
    tarpit,
    too_many_connections,
    too_many_errors,
    too_many_logon_failures,
)
from mailyard.lockout import source_of
from mailyard.org import ReceiveConnector
from mailyard.orgstore import hash_passwords
from tests.conftest import make_org

ORG = hash_passwords(make_org())  # as hubs read it: `org apply` stores only password hashes
DIRECTORY = Directory(ORG)
CONNECTORS = {c.name: c for c in ORG.receive_connectors}
DEFAULT, INTERNET, CLIENT = CONNECTORS["Default"], CONNECTORS["Internet"], CONNECTORS["Client"]
TOKEN = b"contoso-demo-token-change-me"  # the demo's server token of old: it opens nothing now

ALICE = Identity("user", "alice@contoso.com", frozenset({"alice@contoso.com", "a.anders@contoso.com"}))
HUB = Identity("server", "London")  # a hub of London, by its site's certificate


def connector(**fields: object) -> ReceiveConnector:
    return ReceiveConnector.model_validate({"name": "Test", **fields})


def refusal(decide, *args: object, **kwargs: object) -> str:
    with pytest.raises(Refused) as refused:
        decide(*args, **kwargs)
    return refused.value.reply


# region: which connector


@pytest.mark.parametrize(("ip", "expected"), [
    ("127.0.0.1", "Default"),       # the organization's network, more specific than everyone
    ("10.1.2.3", "Default"),
    ("192.0.2.7", "Internet"),
    ("::ffff:10.1.2.3", "Default"),  # an IPv4 client on an IPv6 socket
])
def test_the_most_specific_remote_range_wins(ip: str, expected: str) -> None:
    assert receive_connector_for([DEFAULT, INTERNET], ip).name == expected


def test_no_connector_for_a_client_outside_every_range_or_of_the_other_ip_version() -> None:
    apps = connector(remote_ip_ranges=["127.0.0.5"])
    assert receive_connector_for([apps], "127.0.0.6") is None
    assert receive_connector_for([DEFAULT, INTERNET], "2001:db8::1") is None
    assert receive_connector_for([DEFAULT], "not an address") is None


def test_a_disabled_connector_takes_no_client() -> None:
    disabled = DEFAULT.model_copy(update={"enabled": False})
    assert receive_connector_for([disabled, INTERNET], "127.0.0.1") is INTERNET
    assert receive_connector_for([disabled], "127.0.0.1") is None


def test_a_listener_serves_the_connectors_of_its_binding_for_its_site() -> None:
    assert [c.name for c in connectors_for(ORG, "0.0.0.0:25", "Amsterdam")] == ["Default", "Internet"]
    assert [c.name for c in connectors_for(ORG, "0.0.0.0:587", "London")] == ["Client"]
    london_only = connector(bindings=["0.0.0.0:2525"], sites=["London"])
    org = ORG.model_copy(update={"receive_connectors": [london_only]})
    assert connectors_for(org, "0.0.0.0:2525", "Amsterdam") == []
    assert connectors_for(org, "0.0.0.0:2525", "London") == [london_only]


# endregion

# region: what a session offers, and the limits that close it


def test_a_connector_with_logons_offers_auth_only_after_starttls() -> None:
    rules = session_rules(DEFAULT, "127.0.0.1")
    assert rules.starttls and rules.auth_require_tls and rules.auth_methods == {"PLAIN", "LOGIN"}
    assert rules.size_limit == 10 * 1024 * 1024 and rules.implicit is None


def test_a_connector_without_logons_offers_no_auth() -> None:
    rules = session_rules(INTERNET, "192.0.2.7")
    assert rules.starttls and not rules.auth_methods and not rules.auth_require_tls


def test_only_a_connector_with_exchange_server_asks_for_client_certificates() -> None:
    assert session_rules(DEFAULT, "127.0.0.1").client_certs
    assert not session_rules(INTERNET, "192.0.2.7").client_certs and not session_rules(CLIENT, "127.0.0.1").client_certs
    # ExchangeServer alone is no AUTH: hubs never log on with a password
    servers_only = session_rules(connector(auth_mechanisms=["Tls", "ExchangeServer"]), "127.0.0.1")
    assert servers_only.client_certs and not servers_only.auth_methods
    assert not session_rules(connector(auth_mechanisms=["ExchangeServer"]), "127.0.0.1").client_certs, "no Tls"


def test_an_externally_secured_connector_makes_its_clients_exchange_servers_without_a_logon() -> None:
    rules = session_rules(connector(auth_mechanisms=["ExternalAuthoritative"]), "127.0.0.5")
    assert rules.implicit == Identity("server", "[127.0.0.5]", proven=False)
    assert rules.implicit is not None and not rules.implicit.organization_node, \
        "an appliance passes on what the Internet wrote: its organization headers count for nothing"
    assert not rules.starttls and not rules.auth_methods


def test_the_banner_and_fqdn_of_a_connector_replace_the_hubs() -> None:
    rules = session_rules(connector(banner="220 mail.contoso.com Welcome to Contoso", fqdn="mail.contoso.com"), "::1")
    assert (rules.ident, rules.hostname) == ("Welcome to Contoso", "mail.contoso.com")
    assert (session_rules(DEFAULT, "::1").ident, session_rules(DEFAULT, "::1").hostname) == (None, None)


def test_connections_are_capped_per_source_and_per_connector() -> None:
    limited = connector(max_inbound_connection_per_source=2, max_inbound_connection=5)
    assert not too_many_connections(limited, 1, 4)
    assert too_many_connections(limited, 2, 0)
    assert too_many_connections(limited, 0, 5)
    assert (DEFAULT.max_inbound_connection, DEFAULT.max_inbound_connection_per_source) == (5000, 20)


@pytest.mark.parametrize(("ip", "source"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # the same host, to a /64
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),  # an IPv4 client of a dual-stack listener
    ("::1", "::/64"),
])
def test_a_source_is_an_ipv4_address_or_an_ipv6_64(ip: str, source: str) -> None:
    assert source_of(ip) == source


def test_replies_to_a_client_not_logged_on_are_tarpitted_before_a_5xx() -> None:
    conn = connector(tarpit_interval="5s", auth_tarpit_interval="7s")
    assert (conn.tarpit_interval, conn.auth_tarpit_interval) == (5, 7)
    assert tarpit(conn, replies.USER_UNKNOWN, trusted=False) == 5
    assert tarpit(conn, "535 5.7.3 Authentication unsuccessful", trusted=False) == 7
    assert tarpit(conn, replies.LOGON_LOCKED, trusted=False) == 7
    assert tarpit(conn, replies.RECIPIENT_OK, trusted=False) == 0
    assert tarpit(conn, replies.TOO_MANY_RECIPIENTS, trusted=False) == 0  # 4xx: not an error of the client's
    assert tarpit(conn, replies.USER_UNKNOWN, trusted=True) == 0  # a logged-on client never waits


def test_every_5xx_but_a_failed_logon_counts_against_the_error_limit() -> None:
    assert is_error(replies.USER_UNKNOWN) and is_error("500 5.3.3 Unrecognized command 'X'")
    assert not is_error("535 5.7.3 Authentication unsuccessful") and not is_error(replies.NO_RESOURCES)
    assert DEFAULT.max_protocol_errors == 10
    assert not too_many_errors(DEFAULT, 9) and too_many_errors(DEFAULT, 10)
    assert not too_many_errors(connector(max_protocol_errors=0), 1000)


def test_auth_plains_authorization_identity_must_be_the_mailbox_that_logs_on() -> None:
    assert not authzid_refused(DIRECTORY, "alice@contoso.com", "")
    assert not authzid_refused(DIRECTORY, "alice@contoso.com", "A.Anders@contoso.com")  # her alias
    assert authzid_refused(DIRECTORY, "alice@contoso.com", "bob@contoso.com")
    assert authzid_refused(DIRECTORY, "nobody@contoso.com", "nobody@contoso.com")


def test_failed_logons_close_a_connection_at_the_limit_and_never_with_no_limit() -> None:
    assert not too_many_logon_failures(DEFAULT, 2)
    assert too_many_logon_failures(DEFAULT, 3)
    assert not too_many_logon_failures(connector(max_logon_failures=0), 100)


# endregion

# region: logons


def test_a_mailbox_logs_on_with_its_password_and_is_every_one_of_its_addresses() -> None:
    assert logon(DIRECTORY, DEFAULT, "alice@contoso.com", b"alice-demo-password") == ALICE
    assert logon(DIRECTORY, DEFAULT, "A.Anders@contoso.com", b"alice-demo-password") == ALICE, "by an alias"


@pytest.mark.parametrize(("conn", "login", "password"), [
    (DEFAULT, "alice@contoso.com", b"bob-demo-password"),     # someone else's password
    (DEFAULT, "nobody@contoso.com", b""),                      # no such mailbox
    (DEFAULT, "amsterdam-team@contoso.com", b""),              # a group has no password
    (INTERNET, "alice@contoso.com", b"alice-demo-password"),   # no BasicAuth on that connector
])
def test_a_mailbox_logon_fails(conn: ReceiveConnector, login: str, password: bytes) -> None:
    assert logon(DIRECTORY, conn, login, password) is None


def test_a_mailbox_logs_on_against_the_hash_of_its_password_never_a_password_kept_in_clear() -> None:
    alice = next(m for m in ORG.mailboxes if m.address == "alice@contoso.com")
    assert alice.password.startswith("scrypt$") and "alice-demo-password" not in ORG.to_json()
    in_clear = make_org()  # an organization stored by an older Mailyard, passwords in clear
    assert logon(Directory(in_clear), DEFAULT, "alice@contoso.com", b"alice-demo-password") is None


def test_no_login_and_no_secret_makes_a_client_an_exchange_server() -> None:
    # The old server logon (exchange-server/<hub> with the organization's server token) is gone:
    # it fails like any wrong logon, the token included.
    for login in ("exchange-server/lon-1", "Exchange-Server", "exchange-server"):
        assert logon(DIRECTORY, DEFAULT, login, TOKEN) is None
    assert logon(DIRECTORY, DEFAULT, "exchange-server/alice@contoso.com", b"alice-demo-password") is None


def test_a_hub_logs_on_by_its_sites_certificate_where_the_connector_has_exchange_server() -> None:
    # (what pki.peer_identity reads off a verified certificate: the site as a DNS label)
    london = pki.Identity("hub", "london")
    assert certificate_logon(DIRECTORY, DEFAULT, london) == HUB, "the site as the organization spells it"
    assert certificate_logon(DIRECTORY, DEFAULT, pki.Identity("hub", "amsterdam")) == Identity("server", "Amsterdam")
    assert certificate_logon(DIRECTORY, CLIENT, london) is None, "Client has no ExchangeServer"
    assert certificate_logon(DIRECTORY, INTERNET, london) is None
    assert certificate_logon(DIRECTORY, DEFAULT, None) is None, "no certificate, or one that did not verify"


@pytest.mark.parametrize("peer", [
    pki.Identity("mailbox", "mbx-ams-01"),  # a mailbox server is no Exchange server of the transport
    pki.Identity("hub", "paris"),           # a site the organization does not have (any more)
    pki.Identity("hub", "london.evil"),
])
def test_other_certificates_of_the_organization_prove_nothing(peer: pki.Identity) -> None:
    assert certificate_logon(DIRECTORY, DEFAULT, peer) is None


# endregion

# region: permission groups, senders and recipients


def test_permission_groups_are_those_of_the_connector_that_the_client_is_in() -> None:
    assert granted_groups(DEFAULT, None) == set()
    assert granted_groups(DEFAULT, ALICE) == {"ExchangeUsers"}
    assert granted_groups(DEFAULT, HUB) == {"ExchangeServers"}
    assert granted_groups(INTERNET, None) == {"AnonymousUsers"}
    assert granted_groups(INTERNET, ALICE) == {"AnonymousUsers"}, "Internet does not know users"
    assert granted_groups(connector(permission_groups=["Partners"]), None) == {"Partners"}


def test_a_client_in_no_permission_group_may_not_send_even_a_malformed_address() -> None:
    assert refusal(mail_from, DEFAULT, None, "someone@example.org") == replies.NOT_AUTHENTICATED
    assert refusal(mail_from, CLIENT, None, "not an address") == replies.NOT_AUTHENTICATED


def test_the_sender_is_normalized_and_the_null_sender_is_empty() -> None:
    assert mail_from(INTERNET, None, "Someone@Example.ORG") == "someone@example.org"
    assert mail_from(INTERNET, None, "<>") == ""
    assert refusal(mail_from, INTERNET, None, "no-at-sign") == replies.INVALID_SENDER


def test_a_user_sends_only_as_one_of_its_own_addresses() -> None:
    assert mail_from(DEFAULT, ALICE, "alice@contoso.com") == "alice@contoso.com"
    assert mail_from(DEFAULT, ALICE, "a.anders@contoso.com") == "a.anders@contoso.com"
    assert mail_from(DEFAULT, ALICE, "<>") == "", "a user may send a notification"
    assert refusal(mail_from, DEFAULT, ALICE, "bob@contoso.com") == replies.SEND_AS_DENIED


def test_servers_and_anonymous_clients_send_as_anyone_but_a_logged_on_user_as_itself() -> None:
    assert mail_from(DEFAULT, HUB, "bob@contoso.com") == "bob@contoso.com"
    assert mail_from(INTERNET, None, "bob@contoso.com") == "bob@contoso.com"
    # A logon says who the client is: AnonymousUsers on the connector changes nothing for it
    anyone = connector(permission_groups=["AnonymousUsers", "ExchangeUsers"])
    assert refusal(mail_from, anyone, ALICE, "bob@contoso.com", DIRECTORY) == replies.SEND_AS_DENIED


def granting(**grants: list[str]) -> Directory:
    """The directory where bob grants alice the given rights (send_as=..., send_on_behalf=...)."""
    boxes = [mb.model_copy(update=grants) if mb.address == "bob@contoso.com" else mb for mb in ORG.mailboxes]
    return Directory(ORG.model_copy(update={"mailboxes": boxes}))


def test_send_as_or_send_on_behalf_lets_a_user_use_that_mailbox_as_envelope_sender() -> None:
    for grant in ("send_as", "send_on_behalf"):
        assert mail_from(DEFAULT, ALICE, "bob@contoso.com", granting(**{grant: ["alice@contoso.com"]})) == \
            "bob@contoso.com", grant
    assert refusal(mail_from, DEFAULT, ALICE, "bob@contoso.com", granting(full_access=["alice@contoso.com"])) == \
        replies.SEND_AS_DENIED, "FullAccess is no right to send"


def head(text: str):  # type: ignore[no-untyped-def]
    from mailyard import headers as mail_headers

    return mail_headers.parse(text.replace("\n", "\r\n").encode() + b"\r\n\r\nbody\r\n")


@pytest.mark.parametrize(("grants", "fields", "allowed"), [
    ({}, "From: alice@contoso.com", True),
    ({}, "From: \"Alice\" <a.anders@contoso.com>", True),
    ({}, "From: \"Bob Berg\" <bob@contoso.com>", False),
    ({}, "From: alice@contoso.com\nFrom: ceo@contoso.com", False),
    ({}, "From: alice@contoso.com, dave@contoso.com", False),
    ({}, "From: alice@contoso.com, a.anders@contoso.com", False),  # several From, no Sender
    ({}, "From: alice@contoso.com, a.anders@contoso.com\nSender: alice@contoso.com", True),
    ({}, "From: alice@contoso.com\nSender: bob@contoso.com", False),
    ({}, "From: someone@fabrikam.example", False),
    ({"send_as": ["alice@contoso.com"]}, "From: bob@contoso.com", True),
    ({"send_on_behalf": ["alice@contoso.com"]}, "From: bob@contoso.com", False),  # not saying who sent it
    ({"send_on_behalf": ["alice@contoso.com"]}, "From: bob@contoso.com\nSender: alice@contoso.com", True),
    ({"send_on_behalf": ["alice@contoso.com"]}, "From: bob@contoso.com\nSender: dave@contoso.com", False),
    ({"full_access": ["alice@contoso.com"]}, "From: bob@contoso.com", False),
])
def test_a_logged_on_user_may_send_as_each_from_only_with_a_right_to(grants, fields, allowed) -> None:
    found = header_senders_refusal(granting(**grants), ALICE, head(fields))
    assert (found is None) == allowed, found
    assert header_senders_refusal(granting(**grants), HUB, head(fields)) is None, "a hub relays what it got"
    assert header_senders_refusal(granting(**grants), None, head(fields)) is None, "anonymous: the connector decides"


def test_anonymous_clients_send_only_to_recipients_that_exist_in_accepted_domains() -> None:
    assert rcpt_to(INTERNET, None, "Bob@Contoso.com", DIRECTORY, taken=0) == "bob@contoso.com"
    for existing in ("a.anders@contoso.com", "grace.fabrikam@contoso.com"):
        assert rcpt_to(INTERNET, None, existing, DIRECTORY, taken=0) == existing, "aliases, contacts"
    assert refusal(rcpt_to, INTERNET, None, "nobody@contoso.com", DIRECTORY, taken=0) == replies.USER_UNKNOWN
    assert refusal(rcpt_to, INTERNET, None, "friend@fabrikam.example", DIRECTORY, taken=0) == replies.UNABLE_TO_RELAY


def open_groups(*addresses: str) -> Directory:
    """The demo's directory with ``addresses`` open to senders that did not log on."""
    groups = [g.model_copy(update={"require_sender_authentication": g.address not in addresses}) for g in ORG.groups]
    return Directory(ORG.model_copy(update={"groups": groups}))


def test_groups_take_mail_only_from_senders_that_proved_who_they_are_unless_opened() -> None:
    # RequireSenderAuthenticationEnabled, Exchange's default: on for every group of the demo
    for group in ("all-staff@contoso.com", "amsterdam-team@contoso.com"):
        assert refusal(rcpt_to, INTERNET, None, group, DIRECTORY, taken=0) == replies.AUTH_REQUIRED
        assert rcpt_to(DEFAULT, ALICE, group, DIRECTORY, taken=0) == group
        assert rcpt_to(DEFAULT, HUB, group, DIRECTORY, taken=0) == group
    opened = open_groups("all-staff@contoso.com", "amsterdam-team@contoso.com")
    assert rcpt_to(INTERNET, None, "all-staff@contoso.com", opened, taken=0) == "all-staff@contoso.com"
    # An open group is no way into a closed one nested in it
    outer_open = open_groups("all-staff@contoso.com")
    assert refusal(rcpt_to, INTERNET, None, "all-staff@contoso.com", outer_open, taken=0) == replies.AUTH_REQUIRED
    assert rcpt_to(INTERNET, None, "bob@contoso.com", DIRECTORY, taken=0) == "bob@contoso.com", "mailboxes: open"


@pytest.mark.parametrize("address", [
    "friend%fabrikam.example@contoso.com",    # percent hack: a contoso.com address that does not exist
    "fabrikam.example!friend@contoso.com",    # bang path, likewise
    "friend@fabrikam.example.",               # trailing dot
    "friend@contoso.com.fabrikam.example",    # an accepted domain as a prefix
    "friend@fabrikam.example@contoso.com",    # two at-signs
    "friend",
])
def test_no_relay_trick_gets_an_anonymous_client_past_the_accepted_domains(address: str) -> None:
    assert refusal(rcpt_to, INTERNET, None, address, DIRECTORY, taken=0) in (
        replies.USER_UNKNOWN, replies.UNABLE_TO_RELAY, replies.INVALID_RECIPIENT)


def test_users_and_servers_may_relay() -> None:
    for identity in (ALICE, HUB):
        assert rcpt_to(DEFAULT, identity, "friend@fabrikam.example", DIRECTORY, taken=0) == "friend@fabrikam.example"
        assert refusal(rcpt_to, DEFAULT, identity, "nobody@contoso.com", DIRECTORY, taken=0) == replies.USER_UNKNOWN


def test_one_recipient_more_than_the_connectors_limit_is_refused_before_anything_else() -> None:
    limited = connector(permission_groups=["AnonymousUsers"], max_recipients_per_message=3)
    assert rcpt_to(limited, None, "bob@contoso.com", DIRECTORY, taken=2) == "bob@contoso.com"
    assert refusal(rcpt_to, limited, None, "bob@contoso.com", DIRECTORY, taken=3) == replies.TOO_MANY_RECIPIENTS
    assert refusal(rcpt_to, limited, None, "bad", DIRECTORY, taken=3) == replies.TOO_MANY_RECIPIENTS
    assert refusal(rcpt_to, limited, None, "bad", DIRECTORY, taken=2) == replies.INVALID_RECIPIENT


# endregion

# region: back pressure, size and hops


def test_mail_from_the_organization_is_mail_from_a_client_that_proved_who_it_is() -> None:
    assert is_internal(ALICE)
    assert is_internal(HUB)
    assert not is_internal(None), "an anonymous client writing bob@contoso.com is no one of ours"


@pytest.mark.parametrize(("level", "internal", "refused"), [
    (Level.NORMAL, False, False), (Level.NORMAL, True, False),
    (Level.MEDIUM, False, True), (Level.MEDIUM, True, False),
    (Level.HIGH, False, True), (Level.HIGH, True, True),
])
def test_back_pressure_refuses_outside_mail_at_medium_and_all_mail_at_high(level: Level, internal: bool,
                                                                         refused: bool) -> None:
    assert pressure_refusal(level, internal) == (replies.NO_RESOURCES if refused else None)


def test_a_hub_relaying_within_the_organization_has_no_size_limit() -> None:
    assert size_limit(DEFAULT, HUB) is None
    assert size_limit(DEFAULT, ALICE) == size_limit(INTERNET, None) == 10 * 1024 * 1024


def test_a_message_with_as_many_received_headers_as_the_hop_limit_is_refused() -> None:
    def message(hops: int) -> bytes:
        return b"".join(b"Received: from hop%d by hop%d; Thu, 26 Nov 2026 10:00:00 +0000\r\n" % (i, i)
                        for i in range(hops)) + b"Subject: around\r\n\r\nReceived: in the body\r\n"

    limited = connector(max_hop_count=3)
    check_hops(limited, None, message(2), org_hops=2)
    assert refusal(check_hops, limited, None, message(3), org_hops=2) == replies.HOP_COUNT
    assert refusal(check_hops, limited, ALICE, message(3), org_hops=2) == replies.HOP_COUNT
    # A hub relaying within the organization brings the Received headers of the hubs before it
    check_hops(limited, HUB, message(4), org_hops=2)
    assert refusal(check_hops, limited, HUB, message(5), org_hops=2) == replies.HOP_COUNT


def test_a_relaying_hubs_origin_is_trusted_from_exchange_servers_only() -> None:
    assert relay_origin(HUB, " 0193abc ") == "0193abc"
    assert relay_origin(HUB, None) == ""
    assert relay_origin(ALICE, "0193abc") == ""
    assert relay_origin(None, "0193abc") == ""


# endregion


def test_postmaster_is_accepted_without_a_domain_and_at_every_accepted_domain() -> None:
    for address in ("postmaster", "PostMaster", "postmaster@contoso.com", "POSTMASTER@Contoso.com"):
        assert rcpt_to(INTERNET, None, address, DIRECTORY, taken=0) == "postmaster@contoso.com", address
    assert DIRECTORY.mailbox_entry("postmaster@contoso.com").address == "frank@contoso.com", "the demo names Frank"
    assert refusal(rcpt_to, INTERNET, None, "webmaster", DIRECTORY, taken=0) == replies.INVALID_RECIPIENT


def test_an_edge_logs_on_with_the_certificate_of_its_subscription_at_its_sites_hubs_only(tmp_path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from mailyard.org import EdgeSubscription

    ca = pki.CA(tmp_path)
    ca.init("Contoso")
    _, self_signed = pki.self_signed("edge-01.edge.invalid")
    issued = ca.issue_for_key(pki.Identity.edge("EDGE-01"), pki.public_key_of(self_signed))
    sub = EdgeSubscription(name="EDGE-01", site="Amsterdam", fqdn="edge-01.edge.invalid", smtp="127.0.0.9:25",
                           sync="127.0.0.9:50636", certificate=self_signed.decode(), issued=issued.decode(),
                           recipient_salt="s")
    directory = Directory(ORG.model_copy(update={"edge_subscriptions": [sub]}))
    der = x509.load_pem_x509_certificate(issued).public_bytes(serialization.Encoding.DER)
    peer = pki.Identity("edge", "edge-01")
    assert certificate_logon(directory, DEFAULT, peer, site="Amsterdam", certificate=der) == Identity("server", "EDGE-01")
    assert certificate_logon(directory, DEFAULT, peer, site="London", certificate=der) is None, "another site's hub"
    # A certificate of the same name from an earlier subscription (the CA issued it too)
    earlier = ca.issue_for_key(pki.Identity.edge("EDGE-01"), pki.public_key_of(pki.self_signed("x")[1]))
    other = x509.load_pem_x509_certificate(earlier).public_bytes(serialization.Encoding.DER)
    assert certificate_logon(directory, DEFAULT, peer, site="Amsterdam", certificate=other) is None
    assert certificate_logon(DIRECTORY, DEFAULT, peer, site="Amsterdam", certificate=der) is None, "not subscribed"
