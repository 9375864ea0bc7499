"""Ports a person can remember, and two sites on one machine (issue 16, item 5): `site up`
takes the fixed defaults (SMTP 2525 and 2587, Flower 5555, the Queue Viewer 8080, the demo
Internet's MX hosts on the send connector's 2525) when they are free, else free ports, and
prints them; a second site started at the same moment takes none of the first one's.

The tests never count on a fixed port being free, nor take one (the compose walkthrough
publishes them): ports found free stand in for the defaults."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from mailyard.site.ports import Ports, bindable, free_port
from tests.conftest import ROOT
from tests.site_run import RunningSite, delivers_mail, unanswered

# region: choosing ports


def test_a_default_port_that_is_free_is_taken_and_claimed_against_another_site(tmp_path) -> None:
    default = free_port()
    first, second = Ports(locks=tmp_path), Ports(locks=tmp_path)
    assert first.take(default) == default
    # Another site of this user (its own Ports) does not take it while the first one runs,
    # even before the first site's child listens there
    other = second.take(default)
    assert other != default and other > 0
    # Once the first site is gone, its claim is gone with it
    first.close()
    assert Ports(locks=tmp_path).take(default) == default


def test_a_default_port_another_program_listens_on_is_left_to_it(tmp_path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert not bindable(port, ["127.0.0.1"])
        assert Ports(locks=tmp_path).take(port) != port


def test_one_site_never_hands_out_a_port_twice_on_one_address_but_may_on_another(tmp_path) -> None:
    ports = Ports(locks=tmp_path)
    default = free_port()
    assert ports.take(default) == default
    assert ports.take(default) != default  # a second child on 127.0.0.1
    # The demo Internet's MX hosts (127.0.0.2...) may use the port the first hub has on 127.0.0.1
    assert ports.take(default, ["127.0.0.2", "127.0.0.3"]) == default
    handed = [ports.free() for _ in range(50)]
    assert len(set(handed)) == 50 and default not in handed


def test_free_ports_are_free_at_every_address_asked_and_for_udp_too(tmp_path) -> None:
    ports = Ports(locks=tmp_path)
    port = ports.free(["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    assert bindable(port, ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
    dns = ports.free(udp=True)
    assert bindable(dns, ["127.0.0.1"], socket.SOCK_DGRAM)


# endregion
# region: two sites at once


def addresses(state: dict) -> set[str]:
    """Every host:port a site listens on, as its site.json lists them."""
    found: set[str] = set()
    for p in state["processes"]:
        found.update(p.get("smtp", {}).values())
        found.update(p.get("mx", []))
        if p.get("dns"):
            found.add(p["dns"])
        if p["role"] in ("redis", "mailbox", "flower", "viewer"):
            found.add(p["url"].split("//", 1)[1].split("/", 1)[0])
    return found


def preferred_ports(tmp_path: Path) -> dict[str, int]:
    """Ports free now, to stand in for the fixed defaults (which other tests, and the compose
    walkthrough, may be using): the same for both sites, as 2525 and the others would be."""
    ports = Ports(locks=tmp_path)  # (hands out no port twice)
    return {"smtp": ports.free(), "client": ports.free(), "flower": ports.free(), "viewer": ports.free(),
            "mx": ports.free(["127.0.0.2", "127.0.0.3", "127.0.0.4"])}


@pytest.mark.slow
def test_two_sites_started_at_once_in_two_directories_both_deliver_mail(tmp_path: Path) -> None:
    # As a person would: `mailyard site up` in two directories at once, both wanting the same
    # ports (the demo's organization, its Internet send connector on the same MX port)
    wanted = preferred_ports(tmp_path)
    org = (ROOT / "deploy" / "contoso.toml").read_text()
    assert org.count("port = 2525 ") == 1
    config = tmp_path / "contoso.toml"
    config.write_text(org.replace("port = 2525 ", f"port = {wanted['mx']} "))
    sites = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        sites[name] = RunningSite(
            tmp_path / name / "var", "--config", str(config), "--hubs", "1", "--concurrency", "1",
            "--smtp-port", str(wanted["smtp"]), "--client-port", str(wanted["client"]),
            "--flower-port", str(wanted["flower"]), "--viewer-port", str(wanted["viewer"]),
            "--no-edge",  # (the hubs send to the demo Internet's MX port themselves: both want it)
            cwd=tmp_path / name)
    try:
        states = {name: site.wait_up() for name, site in sites.items()}
        assert not addresses(states["a"]) & addresses(states["b"]), "two sites share a port"
        # Each wanted port went to one site at most (and the other printed where it went instead)
        # (on the hosts it was wanted on: a free port either site took for something else on
        # another loopback address is not the wanted one)
        for what, port in wanted.items():
            hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"] if what == "mx" else ["127.0.0.1"]
            wanted_at = {f"{host}:{port}" for host in hosts}
            holders = [n for n, state in states.items() if addresses(state) & wanted_at]
            assert len(holders) <= 1, (what, port, holders)
        taken = [n for n, site in sites.items() if "is taken (by another site or program)" in site.output]
        assert taken, "neither site gave way to the other"
        for name, site in sites.items():
            assert unanswered(states[name], site.data) == [], name
        for name, site in sites.items():
            delivers_mail(site, name)
        # Each site's mail to the Internet reached its own demo Internet only
        for name in sites:
            other = sites["b" if name == "a" else "a"]
            shown = json.loads(other.mailyard("internet", "show", "fabrikam.example", "--json").stdout)
            assert f"out {name}" not in {m["subject"] for m in shown}
        # Nothing had to be started again (a second demo Internet on 127.0.0.2:2525 looped)
        for name, site in sites.items():
            restarted = {p["name"]: p["restarts"] for p in site.status()["processes"] if p["restarts"]}
            assert restarted == {}, (name, restarted)
    finally:
        for site in sites.values():
            site.stop()


# endregion
