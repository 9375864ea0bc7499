"""``mailyard org dkim`` and mailyard.dkim_keys on a real Redis: a new key is pending until it is
activated (the domain's previous key signs until then, and only active keys reach the Edges),
selectors are DNS labels, the TXT record is printed as a zone file needs it, and every command
takes a domain in any spelling (case, trailing dot, IDN as U-labels or A-labels)."""

from __future__ import annotations

import json
import re

import pytest
import redis
from click.testing import CliRunner

from mailyard import dkim_keys, redisconn
from mailyard.cli.main import cli
from mailyard.edgesync import config_push
from mailyard.org import Organization
from mailyard.orgstore import apply_org, read_org
from tests.conftest import make_org


def dkim_org() -> Organization:
    data = make_org().model_dump(mode="json")
    data["accepted_domains"].append("xn--bcher-kva.example")  # bücher.example, written as A-labels
    return Organization.model_validate(data)


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    client = redisconn.connect(redis_url)
    apply_org(client, dkim_org())
    return client


@pytest.fixture
def run(redis_url: str, r: redis.Redis):
    def invoke(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(cli, ["org", "dkim", *args], env={"MAILYARD_REDIS_URL": redis_url})
        assert result.exit_code == code, f"{args}: {result.exit_code} {result.output}"
        return result.output
    return invoke


def listed(run) -> list[tuple[str, str, str]]:
    return [(x["domain"], x["selector"], x["state"]) for x in json.loads(run("list", "--json"))]


def pushed(r: redis.Redis) -> list[tuple[str, str]]:
    """What EdgeSync would push to an Edge now."""
    _, org = read_org(r)
    return [(k.domain, k.selector) for k in config_push(org, "Amsterdam", "EDGE-01", [],
                                                        dkim=dkim_keys.all_keys(r)).dkim]


def test_a_first_key_is_pending_until_activated_and_only_then_reaches_the_edges(run, r) -> None:
    out = run("new", "contoso.com", "--selector", "s1")
    assert "pending" in out and "mailyard org dkim activate contoso.com s1" in out
    assert "not signed until then" in out
    assert listed(run) == [("contoso.com", "s1", "pending")]
    assert dkim_keys.signing_keys(r) == [] and pushed(r) == []
    assert "is active" in run("activate", "contoso.com", "s1")
    assert listed(run) == [("contoso.com", "s1", "active")]
    assert pushed(r) == [("contoso.com", "s1")]


def test_a_new_key_leaves_the_active_one_signing_until_it_is_activated(run, r) -> None:
    run("new", "contoso.com", "--selector", "s1", "--activate")
    out = run("new", "contoso.com", "--selector", "s2")
    assert "key s1 signs until then" in out
    assert listed(run) == [("contoso.com", "s1", "active"), ("contoso.com", "s2", "pending")]
    assert pushed(r) == [("contoso.com", "s1")]
    table = run("list")
    assert re.search(r"contoso\.com\s+s1\s+active\s+s1\._domainkey\.contoso\.com", table), table
    assert re.search(r"contoso\.com\s+s2\s+pending\s+s2\._domainkey\.contoso\.com", table), table
    # a wrong selector changes nothing
    assert "no pending DKIM key s3" in run("activate", "contoso.com", "s3", code=1)
    assert "active already" in run("activate", "contoso.com", "s1", code=1)
    run("activate", "contoso.com", "s2")
    assert listed(run) == [("contoso.com", "s2", "active")]
    assert pushed(r) == [("contoso.com", "s2")]


def test_the_default_selector_never_takes_the_active_keys(run, r) -> None:
    first = json.loads(run("new", "contoso.com", "--activate", "--json"))
    second = json.loads(run("new", "contoso.com", "--json"))
    assert first["state"] == "active" and second["state"] == "pending"
    assert re.fullmatch(r"my\d{6}", first["selector"]) and second["selector"] == f"{first['selector']}-2"
    assert "is the selector of contoso.com's active key" in run("new", "contoso.com", "--selector",
                                                                 first["selector"], code=1)


@pytest.mark.parametrize("selector", ["bad_selector", "-edge", "edge-", "a.b", "x" * 64, ""])
def test_a_selector_that_is_not_a_dns_label_is_a_one_line_usage_error(run, r, selector: str) -> None:
    out = run("new", "contoso.com", "--selector", selector, code=2)
    assert "--selector" in out and "DNS label" in out
    assert "Traceback" not in out and "validation error" not in out
    assert dkim_keys.all_keys(r) == []


def test_the_txt_record_is_printed_as_strings_of_at_most_255_octets(run, r) -> None:
    out = run("new", "contoso.com", "--selector", "s1")
    (line,) = [x for x in out.splitlines() if " IN TXT " in x]
    assert line.startswith("s1._domainkey.contoso.com.  IN TXT  ")
    strings = re.findall(r'"([^"]*)"', line)
    assert len(strings) > 1 and all(len(s.encode()) <= 255 for s in strings)
    (key,) = dkim_keys.all_keys(r)
    assert "".join(strings) == dkim_keys.txt_value(key)
    assert json.loads(run("list", "--json"))[0]["txt_strings"] == strings


def test_every_command_takes_the_domain_in_any_spelling(run, r) -> None:
    run("new", "XN--BCHER-KVA.example.", "--selector", "s1")
    (key,) = dkim_keys.all_keys(r)
    assert key.domain == "bücher.example"
    assert dkim_keys.txt_name(key) == "s1._domainkey.xn--bcher-kva.example", "DNS wants A-labels"
    run("activate", "Bücher.Example.", "S1")
    assert listed(run) == [("bücher.example", "s1", "active")]
    run("new", "bücher.example", "--selector", "s2")
    assert "removed the pending DKIM key s2 of bücher.example" in run(
        "remove", "xn--bcher-kva.example", "--selector", "s2")
    assert listed(run) == [("bücher.example", "s1", "active")]
    assert "removed the active DKIM key s1" in run("remove", "BÜCHER.EXAMPLE.")
    assert listed(run) == []
    assert "contoso.com has no DKIM key" in run("remove", "contoso.com", code=1)
    assert "has no DKIM key s9" in run("remove", "bücher.example", "--selector", "s9", code=1)
    assert "not a valid domain name" in run("remove", "not a domain", code=2)


def test_keys_stored_before_pending_existed_still_sign(r) -> None:
    from mailyard import keys

    (made,) = [dkim_keys.new_key(r, "contoso.com", "old", activate=True)]
    legacy = made.model_dump(mode="json")
    del legacy["active"]
    r.hset(keys.DKIM_KEYS, "contoso.com", json.dumps(legacy))
    assert [(k.selector, k.active) for k in dkim_keys.signing_keys(r)] == [("old", True)]
