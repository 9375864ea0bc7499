"""Internationalized addresses (RFC 6531, 6532): one canonical form, whichever way written."""

from __future__ import annotations

import pytest

from mailyard.addresses import a_label, ascii_address, canonical, needs_smtputf8, normalize_address
from mailyard.directory import Directory
from mailyard.org import Organization
from tests.conftest import make_org


@pytest.mark.parametrize(("written", "canonical_form"), [
    ("Bob@Contoso.COM", "bob@contoso.com"),
    ("jürgen@bücher.example", "jürgen@bücher.example"),
    ("JÜRGEN@BÜCHER.example", "jürgen@bücher.example"),
    ("jürgen@xn--bcher-kva.example", "jürgen@bücher.example"),  # A-label and U-label: one domain
    ("ju\u0308rgen@bücher.example", "jürgen@bücher.example"),  # NFD in, NFC out (RFC 6532 3.1)
    ("用户@例子.广告", "用户@例子.广告"),
    ("x@xn--p1ai.xn--p1ai", "x@рф.рф"),  # an IDN top-level domain
])
def test_every_spelling_of_an_address_has_one_canonical_form(written: str, canonical_form: str) -> None:
    assert normalize_address(written) == canonical_form
    assert canonical(written) == canonical_form


@pytest.mark.parametrize("bad", [
    "\u202ebob@contoso.com",  # a bidirectional override: makes one address look like another
    "bo\u200db@contoso.com",  # a zero-width joiner
    "bo\u00a0b@contoso.com",  # a no-break space
    "b\udcffb@contoso.com",  # invalid UTF-8, as aiosmtpd hands it over (surrogateescape)
    "b\x85b@contoso.com",  # a C1 control
    "jürgen@bü_cher.example", "jürgen@xn--zz.example", "jürgen@bücher..example", "jürgen",
    "a.@bücher.example", "ü" * 33 + "@bücher.example",  # 66 octets: over RFC 5321's 64
])
def test_what_is_not_an_address_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_address(bad)


def test_ascii_forms_for_dns_and_for_peers_without_smtputf8() -> None:
    assert a_label("bücher.example") == "xn--bcher-kva.example"
    assert ascii_address("info@bücher.example") == "info@xn--bcher-kva.example"
    assert not needs_smtputf8("info@bücher.example")  # an ASCII local part travels as A-labels
    assert needs_smtputf8("jürgen@contoso.com")


def test_the_organization_file_names_utf8_addresses_either_way_and_the_directory_finds_them() -> None:
    data = make_org().model_dump(mode="json")
    data["accepted_domains"].append("xn--bcher-kva.example")  # written as A-labels
    data["mailboxes"].append({"address": "Jürgen@bücher.example", "server": "MBX-AMS-01",
                              "aliases": ["jürgen.müller@contoso.com"]})
    org = Organization.model_validate(data)
    assert "bücher.example" in org.accepted_domains
    directory = Directory(org)
    for spelling in ("jürgen@bücher.example", "JÜRGEN@xn--bcher-kva.example", "Jürgen.Müller@Contoso.com"):
        entry = directory.mailbox_entry(spelling)
        assert entry is not None and entry.address == "jürgen@bücher.example", spelling
    assert directory.is_accepted("x@XN--BCHER-KVA.example")
