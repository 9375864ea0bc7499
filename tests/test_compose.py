"""docker-compose.yml and deploy/Dockerfile, checked without a Docker engine (CI has none).

- The file validates against the Compose Specification's JSON schema (the copy that
  check-jsonschema ships), and with `docker compose config` where a Compose v2 client is.
- Every command of every service, and of every health check, is a real `mailyard` command
  whose options parse; the init service's `org apply`, each hub's `--check` and the Edge's
  subscription (edge-subscribe, then edge-import) run for real against a Redis.
- The services are those of the organization file the init service applies and of the
  runner of `mailyard site up` (so compose and the local site cannot drift), the stateful
  ones have volumes, the scalable hub pins nothing that collides when scaled, and restart
  policies, health checks and stop grace periods are in place.
- The Edge Transport server is in the perimeter: the Internet's mail reaches it (contoso.com's
  MX), the hubs are off the internet network, and no Edge service has the organization's Redis
  password, its CA or a node's certificate.
- The same topology as processes (`mailyard site up --hubs 3`) round-robins over all three
  Amsterdam hubs, and the health commands the containers use judge it correctly.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tomllib
from collections import Counter
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path, PurePosixPath
from typing import Any

import click
import httpx
import pytest
import redis
import yaml
from click.testing import CliRunner

from mailyard import pki, redisconn, registry, tracking
from mailyard.broker import make_app
from mailyard.cli.main import cli
from mailyard.internet.dns import make_resolver
from mailyard.org import Organization, load_org
from mailyard.orgstore import read_org
from mailyard.site.redis_server import free_port
from mailyard.site.runner import Site, SiteConfig
from mailyard.testing.waiting import PROCESS_POLL, wait_until

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SCALABLE = "hub"  # the first site's hubs: `docker compose up --scale hub=N`


# region: reading the compose file


@functools.cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


IMAGE = "mailyard:dev"  # deploy/Dockerfile's image, built by one service, run by every Mailyard service
EDGE_IMAGE = "mailyard-edge:dev"  # its `edge` target (with rspamd), built and run by the rspamd service
# Which service builds which image, from which target of deploy/Dockerfile
BUILDERS = {"init": (IMAGE, "mailyard"), "rspamd": (EDGE_IMAGE, "edge")}


def is_mailyard(service: dict[str, Any]) -> bool:
    return service.get("image") in (IMAGE, EDGE_IMAGE)


def mailyard_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services().items() if is_mailyard(s)}


def command(name: str) -> list[str]:
    cmd = services()[name]["command"]
    assert isinstance(cmd, list), f"{name}: write the command as a list (exec form), not {cmd!r}"
    return [str(a) for a in cmd]


def option(args: list[str], name: str) -> list[str]:
    """The values of a repeatable ``--name VALUE`` option (``--name=VALUE`` too)."""
    out = []
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            out.append(args[i + 1])
        elif arg.startswith(name + "="):
            out.append(arg.split("=", 1)[1])
    return out


def one(args: list[str], name: str) -> str:
    values = option(args, name)
    assert len(values) == 1, f"expected one {name} in {args}, got {values}"
    return values[0]


def role_of(args: list[str]) -> tuple[str, ...]:
    """The mailyard sub-command of ARGS: ("hub",), ("mailbox", "serve"), ..."""
    path, group, rest = [], cli, list(args)
    while isinstance(group, click.Group) and rest:
        sub = group.get_command(click.Context(group), rest[0])
        if sub is None:
            break
        path.append(rest.pop(0))
        group = sub
    return tuple(path)


def role(name: str) -> tuple[str, ...]:
    return role_of(command(name))


def services_running(*path: str) -> list[str]:
    return sorted(n for n in mailyard_services() if role(n) == path)


def one_shots() -> list[str]:
    """The services that run once (restart "no"), and that their dependents wait for."""
    return sorted(n for n, s in services().items() if s.get("restart") == "no")


def networks_of(service: dict[str, Any]) -> set[str]:
    """The networks a service is on (none with network_mode: none; `default` without a networks key)."""
    if service.get("network_mode") == "none":
        return set()
    nets = service.get("networks")
    return set(nets or ["default"])


def address_on(name: str, network: str) -> str:
    return services()[name]["networks"][network]["ipv4_address"]


def subnet_of(network: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(compose()["networks"][network]["ipam"]["config"][0]["subnet"])


def healthcheck_args(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), test
    return [str(a) for a in test[1:]]


def mounts(service: dict[str, Any], *, writable_only: bool = False) -> dict[str, str]:
    """target -> source of the service's volumes (short syntax); ``writable_only``: not those
    mounted read-only (``:ro``, as the Redis password is in every service that needs it)."""
    out = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            if not (writable_only and entry.get("read_only")):
                out[entry["target"]] = entry["source"]
        else:
            source, target, *mode = str(entry).split(":")
            if not (writable_only and "ro" in mode):
                out[target] = source
    return out


def seconds(duration: str) -> float:
    """A compose duration (``330s``, ``5m30s``, ``1h``) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), f"not a duration: {duration!r}"
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def split_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def org_file() -> Path:
    """The organization file the init service applies, on this side of its bind mount."""
    args = command("init")
    assert args[:2] == ["org", "apply"], f"the init service must run `org apply FILE`, not {args}"
    inside = args[2]
    source = mounts(services()["init"]).get(inside)
    assert source is not None, f"init applies {inside}, which no bind mount provides"
    return (ROOT / source).resolve()


@functools.cache
def organization() -> Organization:
    return load_org(org_file())


def image_data_dir() -> PurePosixPath:
    match = re.search(r"MAILYARD_DATA_DIR=(\S+)", DOCKERFILE.read_text())
    assert match, "the Dockerfile sets MAILYARD_DATA_DIR"
    return PurePosixPath(match.group(1))


def mailyard_env(redis_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILYARD_", "FLOWER_"))}
    if redis_url:
        env["MAILYARD_REDIS_URL"] = redis_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_mailyard(args: list[str], *, redis_url: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailyard", *args], cwd=ROOT, env=mailyard_env(redis_url),
                          capture_output=True, text=True, timeout=timeout)


# endregion
# region: the file is valid Compose


def test_the_compose_file_validates_against_the_compose_specification_schema() -> None:
    # check-jsonschema ships the Compose Specification's schema (vendor.compose-spec).
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _compose_client() -> list[str] | None:
    """A Docker Compose v2 client (`docker compose` or `docker-compose`), if this machine has one."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if not shutil.which(cmd[0]):
            continue
        try:
            out = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and re.search(r"Docker Compose version v?[2-9]\.", out.stdout):
            return cmd
    return None


def test_docker_compose_config_accepts_the_file_where_a_compose_client_is_installed() -> None:
    client = _compose_client()
    if client is None:
        pytest.skip("no Docker Compose v2 client on this machine (the schema test above still ran)")
    # `config` parses, interpolates and checks references on the client side: no engine needed.
    result = subprocess.run([*client, "-f", str(COMPOSE), "config", "--format", "json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    assert set(model["services"]) == set(services())
    assert model["services"][SCALABLE].get("ports") in (None, [])


# endregion
# region: every command is a real mailyard command


def parse(args: list[str]) -> dict[str, Any]:
    """Parse ``mailyard ARGS`` exactly as the command line would (names, types, choices,
    required options), without running the command."""
    group: click.Command = cli
    path = ["mailyard"]
    rest = list(args)
    while isinstance(group, click.Group):
        if group.invoke_without_command and (not rest or rest[0].startswith("-")):
            break  # (a group that runs by itself, as `mailyard hub --site S` does)
        assert rest, f"`{' '.join(path)}` needs a sub-command"
        name = rest.pop(0)
        sub = group.get_command(click.Context(group), name)
        assert sub is not None, f"`{' '.join(path)} {name}` is not a mailyard command"
        group, path = sub, [*path, name]
    try:
        ctx = group.make_context(" ".join(path), rest)
    except click.ClickException as exc:
        raise AssertionError(f"`{' '.join([*path, *rest])}`: {exc.format_message()}") from None
    return dict(ctx.params)


def all_mailyard_commands() -> list[tuple[str, list[str]]]:
    out = []
    for name, service in mailyard_services().items():
        assert "entrypoint" not in service, f"{name}: keep the image's entry point (mailyard)"
        out.append((name, command(name)))
        test = healthcheck_args(service) if "healthcheck" in service else []
        if test and test[0] == "mailyard":
            out.append((f"{name} (healthcheck)", test[1:]))
    return out


def test_every_service_and_health_check_runs_a_mailyard_command_with_valid_options() -> None:
    checked = all_mailyard_commands()
    # every service but the one-shot ones has a mailyard health check
    assert len(checked) == 2 * len(mailyard_services()) - len(one_shots()), checked
    runner = CliRunner()
    for where, args in checked:
        with pytest.MonkeyPatch.context() as mp:
            for key in [k for k in os.environ if k.startswith("MAILYARD_")]:
                mp.delenv(key)
            # (with the service's environment, as its container has it, but the password files:
            # they are read as the options parse)
            for key, value in (services()[where.split()[0]].get("environment") or {}).items():
                if not key.endswith("_PASSWORD_FILE"):
                    mp.setenv(key, str(value))
            parse(args)
        path = list(role_of(args))
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, f"{where}: `mailyard {' '.join(path)} --help` failed: {result.output}"


def test_the_init_service_applies_the_organization_and_each_hub_passes_its_dry_run(redis_url: str) -> None:
    # When the init service's command runs against a real Redis (its file from this side of
    # the bind mount)
    args = command("init")
    args[2] = str(org_file())
    result = run_mailyard(args, redis_url=redis_url)
    assert result.returncode == 0, result.stderr
    # Then the organization is stored, pointed at the demo Internet's DNS server
    _, org = read_org(redisconn.connect(redis_url))
    assert org.name == organization().name
    assert org.transport.dns_servers == option(command("init"), "--dns-server")
    # And every hub service's command passes `mailyard hub --check` against it
    for name in services_running("hub"):
        result = run_mailyard([*command(name), "--check"], redis_url=redis_url)
        assert result.returncode == 0 and ": ok" in result.stdout, f"{name}: {result.stdout}{result.stderr}"


def test_org_apply_refuses_a_dns_server_that_is_not_an_address() -> None:
    result = CliRunner().invoke(cli, ["org", "apply", str(org_file()), "--dns-server", "dns.example:53"])
    assert result.exit_code == 2 and "not IP[:PORT]" in result.output, result.output


# endregion
# region: the services are those of the organization and of `site up`


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """What `mailyard site up --config <the init service's file>` would start: with its Edge
    (`--edge`, site up's default), as compose runs it."""
    site = Site(SiteConfig(org=organization(), config_path=org_file(), redis_url="redis://127.0.0.1:1/0",
                           data_dir=tmp_path_factory.mktemp("planned"), hubs_per_site=1, edge=True))
    site.load_secrets()  # (as start() does before it plans: the Edge's Redis has a password of its own)
    site.plan()
    return site


def test_each_mailbox_server_of_the_organization_has_its_service_with_its_own_volume(planned: Site) -> None:
    org_servers = [s for site in organization().sites for s in site.mailbox_servers]
    assert sorted(c.name for c in planned.children if c.role == "mailbox") == sorted(org_servers)
    served = {one(command(name), "--server"): name for name in services_running("mailbox", "serve")}
    assert sorted(served) == sorted(org_servers), "one mailbox service per mailbox server, no more"
    data = image_data_dir() / "mailboxes"
    volumes = set()
    for server, name in served.items():
        assert name == server.lower(), f"the service of {server} is named {server.lower()}, not {name}"
        args = command(name)
        port = one(args, "--port")
        assert one(args, "--advertise-url") == f"https://{name}:{port}", "hubs reach it by its service name, over TLS"
        assert one(args, "--host") == "0.0.0.0"
        volume = mounts(services()[name]).get(str(data))
        assert volume in compose()["volumes"], f"{name}: its Maildirs ({data}) need a named volume"
        volumes.add(volume)
        health = healthcheck_args(services()[name])
        assert health[:3] == ["mailyard", "health", "mailbox"] and one(health, "--url") == f"https://127.0.0.1:{port}"
        assert one(health, "--server") == server, "the health check checks the server's certificate"
    assert len(volumes) == len(served), "each mailbox server has a volume of its own"


def test_the_ca_key_stays_in_the_pki_service_and_each_node_mounts_only_its_own_certificate() -> None:
    pki_service = services()["pki"]
    args = command("pki")
    assert args[:3] == ["org", "ca", "init"] and pki_service.get("restart") == "no"
    ca_dir, export = one(args, "--pki-dir"), one(args, "--export")
    ca_volume = mounts(pki_service)[ca_dir]
    # Besides pki, only the one-shot edge-import sees the CA, read-only: it signs the Edge's
    # certificate (for the key the Edge keeps) when it imports the subscription file.
    importer = services()["edge-import"]
    assert role("edge-import") == ("org", "edge", "import") and "edge-import" in one_shots()
    assert mounts(importer)[one(command("edge-import"), "--pki-dir")] == ca_volume
    assert f"{ca_volume}:{one(command('edge-import'), '--pki-dir')}:ro" in importer["volumes"]
    for name, service in services().items():
        if name not in ("pki", "edge-import"):
            assert ca_volume not in " ".join(map(str, service.get("volumes", []))), f"{name} may not see the CA key"
    node_dir = str(image_data_dir() / "pki")
    expected = {name: f"mailbox-{name}" for name in services_running("mailbox", "serve")}
    expected |= {name: f"hub-{site.lower()}" for site, name in hub_services().items()}
    for name, stem in expected.items():
        volume = mounts(pki_service)[f"{export}/{stem}"]
        assert f"{volume}:{node_dir}:ro" in services()[name]["volumes"], f"{name} mounts {volume} read-only"
        for other, service in services().items():
            if other not in (name, "pki"):
                assert volume not in " ".join(map(str, service.get("volumes", []))), f"{other} sees {name}'s key"
        assert services()[name]["depends_on"]["pki"]["condition"] == "service_completed_successfully", name


def hub_services() -> dict[str, str]:
    """site -> the hub service of that site."""
    out: dict[str, str] = {}
    for name in services_running("hub"):
        site = one(command(name), "--site")
        assert site not in out, f"site {site} has two hub services ({out[site]}, {name}); scale one instead"
        out[site] = name
    return out


def test_each_site_has_one_hub_service_whose_bindings_are_those_site_up_gives_its_hubs(planned: Site) -> None:
    sites = [s.name for s in organization().sites]
    hubs = hub_services()
    assert sorted(hubs) == sorted(sites)
    assert sorted({c.endpoints["site"] for c in planned.children if c.role == "hub"}) == sorted(sites)
    # The first site's hubs are the scalable `hub` service, the others hub-<site>.
    assert hubs[sites[0]] == SCALABLE
    for site in sites[1:]:
        assert hubs[site] == f"hub-{site.lower()}"
    for site, name in hubs.items():
        runner_hub = next(c for c in planned.children if c.role == "hub" and c.endpoints["site"] == site)
        wanted = {b.split("=", 1)[0] for b in option(runner_hub.cmd, "--bind")}
        binds = dict(b.split("=", 1) for b in option(command(name), "--bind"))
        assert set(binds) == wanted, f"{name}: map every binding of the site's receive connectors: {sorted(wanted)}"
        for actual in binds.values():
            assert split_address(actual)[1] >= 1024, f"{name}: the image runs as a non-root user: {actual}"


def edge_redis_services() -> list[str]:
    """The Redis services of one's own (not the organization's group): the Edge's."""
    return sorted(n for n, s in services().items() if (s.get("entrypoint") or [])[:2] == ["redis-group", "single"])


def edge_side() -> list[str]:
    """The Edge's services: its own Redis and whatever runs a `mailyard edge` command (the
    Edge, its subscription on the Edge's side, its rspamd)."""
    return sorted([*edge_redis_services(), *(n for n in mailyard_services() if role(n)[:1] == ("edge",))])


def test_site_up_and_compose_run_the_same_roles(planned: Site) -> None:
    assert {c.role for c in planned.children} - {"mailbox", "hub"} == {
        "internet", "flower", "viewer", "edge", "edge-redis"}
    assert services_running("internet", "serve") == ["internet"]
    assert services_running("flower") == ["flower"]
    assert services_running("viewer") == ["viewer"]
    # The Edge and its Redis, one of each, as site up's
    assert [c.name for c in planned.children if c.role == "edge"] == ["edge-01"]
    assert services_running("edge", "run") == ["edge"]
    assert edge_redis_services() == ["edge-redis"]
    # What site up's Edge does within its own process or its runner, compose does in services
    # of their own: rspamd (which `edge run` would start itself; here `edge run --rspamd URL`
    # calls the rspamd service) and the subscription (which site up makes on its first start:
    # `edge subscribe` on the Edge's side, `org edge import` on the organization's).
    assert services_running("edge", "rspamd") == ["rspamd"]
    assert services_running("edge", "subscribe") == ["edge-subscribe"]
    assert services_running("org", "edge", "import") == ["edge-import"]
    assert edge_side() == ["edge", "edge-redis", "edge-subscribe", "rspamd"]
    # And nothing else runs: every service is one of those, a Redis member, the CA or init
    others = {n for n in services() if n not in (*edge_side(), *services_running("mailbox", "serve"),
                                                  *services_running("hub"), "internet", "flower", "viewer",
                                                  "edge-import")}
    assert others == {*redis_members(), "pki", "init"}, others
    # The demo Internet's MX hosts listen where the DNS-routed send connectors the file turns on
    # deliver (none: the Edge's own, which the import creates, is checked in
    # test_the_edge_subscribes_as_compose_subscribes_it): compose applies the file as it is.
    ports = {str(c.port) for c in organization().send_connectors if c.dns_routing and c.enabled}
    assert ports <= {one(command("internet"), "--smtp-port")}


def test_the_demo_internet_is_on_its_own_network_and_its_mail_for_the_organization_reaches_the_edge() -> None:
    from mailyard.cli.internet import parse_record
    from mailyard.internet.dns import MX, A

    internet = services()["internet"]
    args = command("internet")
    address = address_on("internet", "internet")
    assert ipaddress.ip_address(address) in subnet_of("internet")
    assert compose()["networks"]["internet"].get("internal") is True, "the demo Internet leads nowhere"
    # The organization's resolver is the demo DNS server, and every demo MX host is this address.
    assert option(command("init"), "--dns-server") == [one(args, "--dns")]
    assert split_address(one(args, "--dns"))[0] == address
    assert one(args, "--mx-address") == address
    # Only the Internet and the Edge's side are on that network: the hubs, the mailbox servers
    # and every other service of the organization are not (the Edge takes the Internet's mail,
    # and the hubs send theirs out through it).
    assert {n for n, s in services().items() if "internet" in networks_of(s)} == {"internet", "edge", "rspamd"}
    for name in hub_services().values():
        assert networks_of(services()[name]) == {"default"}, f"{name} is off the internet network"
    # Every accepted domain's MX is the Edge, at its address on the internet network
    edge_address = address_on("edge", "internet")
    assert ipaddress.ip_address(edge_address) in subnet_of("internet") and edge_address != address
    records = [parse_record(r) for r in option(args, "--record")]
    a = {name: rr.address for name, rr in records if isinstance(rr, A)}
    for domain in organization().accepted_domains:
        mx = [rr for name, rr in records if name == domain and isinstance(rr, MX)]
        assert mx and all(a.get(rr.exchange) == edge_address for rr in mx), f"{domain}'s MX: the Edge, {records}"
    # `mailyard internet send` there hands mail to the Edge's receive connector, where it listens
    subscribe = command("edge-subscribe")
    listen_host, listen_port = split_address(one(subscribe, "--smtp-listen"))
    assert listen_host == "0.0.0.0" and split_address(one(subscribe, "--smtp"))[1] == listen_port
    assert internet["environment"]["MAILYARD_INTERNET_SERVER"] == f"{edge_address}:{listen_port}"
    assert internet["environment"]["MAILYARD_INTERNET_SOURCE"] == address
    assert healthcheck_args(internet)[-1] == f"{address}:{one(args, '--smtp-port')}"
    # The hubs take no mail from the Internet, and send none there themselves: the file's
    # anonymous receive connectors and DNS-routed send connectors (for a site without an Edge:
    # `site up --no-edge` turns them on) are off, as site up leaves them out when it has an Edge.
    from mailyard.site import edge as demo_edge

    assert not [c.name for c in organization().receive_connectors if c.enabled and "AnonymousUsers" in c.permission_groups]
    assert not [c.name for c in organization().send_connectors if c.enabled and c.dns_routing and not c.source_edges]
    with_edge = demo_edge.without_internet_connectors(organization(), None)
    assert sorted(c.name for c in with_edge.receive_connectors if c.enabled) == sorted(
        c.name for c in organization().receive_connectors if c.enabled)
    # The demo Internet holds nothing of the organization's: no Redis, no secret, no Redis hosts
    assert not (internet.get("environment") or {}).keys() & {"MAILYARD_REDIS_URL", "MAILYARD_REDIS_PASSWORD_FILE"}
    assert set(mounts(internet).values()) == {"internet-mail"} and "extra_hosts" not in internet


def test_the_edge_reaches_the_hubs_and_they_reach_it_on_the_organizations_network() -> None:
    from mailyard.hub.receive_policy import receive_connector_for

    edge = services()["edge"]
    assert networks_of(edge) == {"default", "perimeter", "internet"}
    # The hubs of its site push EdgeSync and deliver to it by its service name on the
    # organization's network (the one network they share), where it listens
    subscribe = command("edge-subscribe")
    for option_name in ("--smtp", "--sync"):
        host, port = split_address(one(subscribe, option_name))
        listen_host, listen_port = split_address(one(subscribe, option_name + "-listen"))
        assert host == "edge" and port == listen_port and listen_host == "0.0.0.0", option_name
    for name in hub_services().values():
        assert networks_of(services()[name]) & networks_of(edge) == {"default"}, name
    # The Edge delivers to each hub at the receive connector that takes Exchange servers by
    # certificate (hub/edgesync.py's hub_endpoints), at the address the hub registers (its host
    # name, the container's: Docker's DNS resolves it on the organization's network); coming
    # from the organization's network, the connector that matches it must be that one.
    network = compose()["networks"]["default"]["ipam"]["config"][0]
    some_address = str(next(ipaddress.ip_network(network["ip_range"]).hosts()))  # (the Edge's is dynamic)
    site = one(command("edge-import"), "--site")
    assert site in hub_services()
    connectors = [c for c in organization().receive_connectors if not c.sites or site in c.sites]
    bindings = {b.split("=", 1)[0] for b in option(command(hub_services()[site]), "--bind")}
    for binding in bindings:
        chosen = receive_connector_for([c for c in connectors if binding in c.bindings], some_address)
        if chosen is not None and "ExchangeServers" in chosen.permission_groups and "ExchangeServer" in chosen.auth_mechanisms:
            break
    else:
        raise AssertionError(f"no receive connector of {site}'s hubs takes the Edge (by certificate) from {some_address}")


# endregion
# region: the Edge Transport server

ORG_REDIS_ENV = ("MAILYARD_REDIS_URL", "MAILYARD_REDIS_PASSWORD_FILE")


def org_side_volumes() -> set[str]:
    """The named volumes the organization's services mount (all but the Edge's and the Internet's)."""
    return {v for n, s in services().items() if n not in (*edge_side(), "internet") for v in mounts(s).values()
            if not v.startswith((".", "/"))}


def test_no_edge_service_has_the_organizations_redis_password_its_ca_or_a_nodes_certificate() -> None:
    shared = {"edge-subscription"}  # the subscription file's way from the Edge to edge-import, which deletes it
    for name in edge_side():
        service = services()[name]
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        # No Redis of the organization's, neither its URL nor its password file, nor its hosts
        # (the Edge's Redis names its own password file to deploy/redis-group.sh)
        if name in edge_redis_services():
            assert env["MAILYARD_REDIS_PASSWORD_FILE"] != str(redis_password_file()) and "MAILYARD_REDIS_URL" not in env
        else:
            assert not env.keys() & set(ORG_REDIS_ENV), f"{name}: {env}"
        assert "sentinel" not in " ".join(env.values()), f"{name}: {env}"
        assert "extra_hosts" not in service, f"{name}: the Redis group's addresses are none of its business"
        assert name not in redis_users() and name not in redis_members()
        # No volume of the organization's side: not its Redis password (redis-secret), not the
        # CA (pki-ca), no node's certificate, no secret of its operator; only the file handed over
        volumes = set(mounts(service).values())
        assert REDIS_SECRET_VOLUME not in volumes and not any(v.startswith("pki-") for v in volumes), (name, volumes)
        assert volumes & org_side_volumes() <= shared, (name, volumes & org_side_volumes())
        # Nothing of the organization's network but the Edge itself (where the hubs reach it)
        if name != "edge":
            assert "default" not in networks_of(service), f"{name} is off the organization's network"
    # The file handed over goes one way: edge-subscribe writes it, edge-import (the organization's
    # side, a one-shot) reads and deletes it; the Edge itself never mounts that volume.
    file = command("edge-import")[3]  # (org edge import FILE)
    folder = str(PurePosixPath(file).parent)
    assert mounts(services()["edge-import"])[folder] == "edge-subscription"
    assert "--remove-file" in command("edge-import") and "edge-import" in one_shots()
    assert one(command("edge-subscribe"), "--file") == file and mounts(services()["edge-subscribe"])[folder] == "edge-subscription"
    assert {n for n, s in services().items() if "edge-subscription" in mounts(s).values()} == {"edge-subscribe", "edge-import"}
    # edge-subscribe makes the Edge's key and certificate, and needs no network at all
    assert services()["edge-subscribe"].get("network_mode") == "none" and "edge-subscribe" in one_shots()
    # The perimeter network is the Edge's own: nothing of the organization is on it
    assert compose()["networks"]["perimeter"].get("internal") is True
    assert {n for n, s in services().items() if "perimeter" in networks_of(s)} == {"edge", "edge-redis", "rspamd"}


def test_the_edge_has_its_own_durable_redis_with_a_password_of_its_own() -> None:
    edge, name = services()["edge"], "edge-redis"
    service, env = services()[name], member_env(name)
    assert re.fullmatch(r"\$\{REDIS_IMAGE:-redis:7\.\d+(-alpine)?\}", service["image"]), name
    assert service["entrypoint"] == ["redis-group", "single"] and "ports" not in service
    assert f"./deploy/redis-group.sh:{REDIS_GROUP_IN_CONTAINER}:ro" in service["volumes"]
    assert networks_of(service) == {"perimeter"}
    assert env["MAILYARD_REDIS_SELF"] == f"{name}:{REDIS_PORT}"
    assert healthcheck_args(service) == ["redis-group", "health", "single"] and service["restart"] == "unless-stopped"
    # Durable as the organization's data nodes (its queues hold the mail it acknowledged), on a volume of its own
    args = command(name)
    assert args[0] == "redis-server" and args[1].endswith(".conf") and "--requirepass" not in args
    assert option(args, "--appendonly") == ["yes"] and option(args, "--appendfsync") == ["always"]
    assert option(args, "--save") == [""] and option(args, "--maxmemory-policy") == ["noeviction"]
    declared = set(compose()["volumes"])
    assert mounts(service)["/data"] in declared and mounts(service)["/data"] not in org_side_volumes()
    # Its password: generated into a volume of its own, which the Edge mounts read-only and
    # nothing of the organization mounts; the Edge's URL names no password
    secret = PurePosixPath(env["MAILYARD_REDIS_PASSWORD_FILE"])
    volume = mounts(service)[str(secret.parent)]
    assert volume in declared and volume != REDIS_SECRET_VOLUME and volume not in org_side_volumes()
    edge_env = edge["environment"]
    assert edge_env["MAILYARD_EDGE_REDIS_PASSWORD_FILE"] == str(secret)
    assert f"{volume}:{secret.parent}:ro" in edge["volumes"]
    url = edge_env["MAILYARD_EDGE_REDIS_URL"]
    assert not redisconn.has_password(url) and not redisconn.is_sentinel(url)
    assert url.startswith(f"redis://{env['MAILYARD_REDIS_SELF']}/"), url
    assert edge["depends_on"][name]["condition"] == "service_healthy"
    assert "redis://" not in " ".join(command("edge")), "the Edge's Redis in its environment, not on its command line"


def test_the_edge_calls_rspamd_in_the_perimeter_and_rspamd_asks_the_edges_dns() -> None:
    rspamd = services()["rspamd"]
    args = command("rspamd")
    # The Edge calls it where it listens: at its fixed perimeter address only (not on the
    # internet network, where it has a leg for DNS)
    listen = one(args, "--listen")
    host, port = split_address(listen)
    assert host == address_on("rspamd", "perimeter") and ipaddress.ip_address(host) in subnet_of("perimeter")
    assert networks_of(rspamd) == {"perimeter", "internet"}
    assert one(command("edge"), "--rspamd") == f"http://{listen}"
    assert healthcheck_args(rspamd) == ["mailyard", "health", "http", f"http://{listen}/ping"]
    # Its DNS is the Edge's: the organization's DNS servers, which EdgeSync gives the Edge
    assert option(args, "--dns-server") == option(command("init"), "--dns-server")
    # Its configuration in its data directory, which the image makes for its user
    assert rspamd["environment"]["MAILYARD_DATA_DIR"] == str(image_data_dir())
    assert "rspamd" in DOCKERFILE.read_text() and f"{image_data_dir()}/rspamd" in DOCKERFILE.read_text()
    assert services()["edge"]["depends_on"]["rspamd"]["condition"] in ("service_started", "service_healthy")


def edge_side_paths(tmp: Path, name: str) -> dict[str, Path]:
    """The service's mount targets as folders of this machine: a named volume is one folder
    for every service that mounts it (tmp/volumes/<name>), a bind mount its source."""
    out = {}
    for target, source in mounts(services()[name]).items():
        out[target] = (ROOT / source).resolve() if source.startswith(".") else tmp / "volumes" / source
        if not source.startswith("."):
            out[target].mkdir(parents=True, exist_ok=True)
    return out


def run_as_service(name: str, tmp: Path, args: list[str] | None = None, *, redis_url: str | None = None,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The service's command (or ARGS) run here, its paths on its volumes as folders of TMP,
    its environment but for Redis (REDIS_URL instead, the tests')."""
    paths = sorted(edge_side_paths(tmp, name).items(), key=lambda kv: -len(kv[0]))

    def here(value: str) -> str:
        for target, folder in paths:
            if value == target or value.startswith(target + "/"):
                return str(folder) + value[len(target):]
        return value

    own = {k: here(str(v)) for k, v in (services()[name].get("environment") or {}).items()
           if k not in (*ORG_REDIS_ENV, "MAILYARD_EDGE_REDIS_URL", "MAILYARD_EDGE_REDIS_PASSWORD_FILE")}
    full = {**mailyard_env(redis_url), **own, **(env or {})}
    return subprocess.run([sys.executable, "-m", "mailyard", *map(here, args or command(name))], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=60)


def test_the_edge_subscribes_as_compose_subscribes_it(redis_server, tmp_path: Path) -> None:
    from mailyard.edgesync import internet_connector_name

    url = redis_server.new_db()
    # Given the organization applied and its CA made (as init and pki do)
    args = command("init")
    args[2] = str(org_file())
    assert run_mailyard(args, redis_url=url).returncode == 0
    ca = run_as_service("pki", tmp_path, [*command("pki")[:4], "--pki-dir", one(command("pki"), "--pki-dir")])
    assert ca.returncode == 0, ca.stderr
    # When edge-subscribe and then edge-import run, as the first `up` runs them
    subscribed = run_as_service("edge-subscribe", tmp_path)
    assert subscribed.returncode == 0, subscribed.stderr
    file = tmp_path / "volumes" / "edge-subscription" / PurePosixPath(one(command("edge-subscribe"), "--file")).name
    assert file.exists() and (os.stat(file).st_mode & 0o777) == 0o600
    imported = run_as_service("edge-import", tmp_path, redis_url=url)
    assert imported.returncode == 0, imported.stderr
    # Then the file (its bootstrap secret in clear) is gone, and EDGE-01 is subscribed to the
    # site, at the addresses the hubs reach it by
    assert not file.exists()
    _, org = read_org(redisconn.connect(url))
    site = one(command("edge-import"), "--site")
    [edge] = org.edge_subscriptions
    subscribe = command("edge-subscribe")
    assert (edge.name, edge.site, edge.fqdn) == (one(subscribe, "--name"), site, one(subscribe, "--fqdn"))
    assert (edge.smtp, edge.sync) == (one(subscribe, "--smtp"), one(subscribe, "--sync"))
    # And its send connector delivers where the demo Internet's MX hosts listen
    connector = next(c for c in org.send_connectors if c.name == internet_connector_name(site))
    assert connector.dns_routing and connector.source_edges == [edge.name] and connector.enabled
    assert str(connector.port) == one(command("internet"), "--smtp-port")
    # And every hub service passes its dry run against it
    for name in services_running("hub"):
        result = run_mailyard([*command(name), "--check"], redis_url=url)
        assert result.returncode == 0 and ": ok" in result.stdout, f"{name}: {result.stdout}{result.stderr}"
    # And the Edge knows itself (`edge status`, as the README runs it in the edge service),
    # not bootstrapped yet: no hub has pushed to it
    status = run_as_service("edge", tmp_path, ["edge", "status", "--json"], env={
        "MAILYARD_EDGE_REDIS_URL": redis_server.new_db()})
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert (shown["name"], shown["smtp"], shown["subscribed"]) == (edge.name, edge.smtp, False), shown
    # When every later `up` runs both again, nothing changes: one subscription, one connector
    for name in ("edge-subscribe", "edge-import"):
        again = run_as_service(name, tmp_path, redis_url=url if name == "edge-import" else None)
        assert again.returncode == 0, f"{name}: {again.stderr}"
    _, org = read_org(redisconn.connect(url))
    assert [e.name for e in org.edge_subscriptions] == [edge.name] and not file.exists()
    assert [c.name for c in org.send_connectors].count(internet_connector_name(site)) == 1


# endregion
# region: state, scaling, restarts, health


def test_every_stateful_service_keeps_its_state_on_a_named_volume() -> None:
    declared = set(compose()["volumes"])
    for name in redis_members():
        assert mounts(services()[name]).get("/data") in declared, f"{name} keeps its AOF or its Sentinel config in /data"
    # (the Edge's data directory: its key, its certificates, what EdgeSync brought)
    stateful = [*redis_members(), *services_running("mailbox", "serve"), "internet", *edge_redis_services(), "edge"]
    used: list[str] = []
    for name in stateful:
        named = [v for v in mounts(services()[name], writable_only=True).values()
                 if not v.startswith((".", "/")) and v != REDIS_SECRET_VOLUME]
        assert named and set(named) <= declared, f"{name} needs a named volume"
        used += named
    assert len(used) == len(set(used)), f"no two services share a volume: {used}"


def test_no_service_pins_a_name_and_the_scalable_hub_publishes_no_port() -> None:
    for name, service in services().items():
        # Node names come from the container's host name (hub@<container id>).
        assert "container_name" not in service, f"{name}: container_name stops scaling and collides"
        assert "hostname" not in service, f"{name}: a fixed hostname gives scaled hubs one node name"
    hub = services()[SCALABLE]
    assert not hub.get("ports"), "published ports collide when the hub is scaled"
    assert not option(command(SCALABLE), "--name"), "the node name must come from the container"
    for net in (hub.get("networks") or {}):
        settings = hub["networks"][net] if isinstance(hub["networks"], dict) else None
        assert not (settings or {}).get("ipv4_address"), "a static address collides when scaled"
    # The one published SMTP port is on a hub that is not scaled, at one of its listeners.
    for name in hub_services().values():
        actual = {str(split_address(a)[1]) for a in dict(b.split("=", 1) for b in option(command(name), "--bind")).values()}
        for port in services()[name].get("ports", []):
            assert str(port).split(":")[-1] in actual, f"{name}: {port} publishes no listener"


# region: Redis under Sentinel

# The Redis group's members run deploy/redis-group.sh (mounted here) as their entry point.
REDIS_GROUP_SCRIPT = ROOT / "deploy" / "redis-group.sh"
REDIS_GROUP_IN_CONTAINER = "/usr/local/bin/redis-group"
REDIS_PORT, SENTINEL_PORT = 6379, 26379
# The Redis password: generated by the group's first start into a volume, read from there.
REDIS_SECRET_VOLUME = "redis-secret"


def redis_members() -> dict[str, str]:
    """service -> "node" (a data node) or "sentinel", in the file's order: the organization's
    Redis group (not the Edge's Redis, `redis-group single`, which is no member)."""
    out = {}
    for name, service in services().items():
        entrypoint = service.get("entrypoint")
        if isinstance(entrypoint, list) and entrypoint[:1] == ["redis-group"] and entrypoint[1] in ("node", "sentinel"):
            out[name] = entrypoint[1]
    return out


def data_nodes() -> list[str]:
    return [n for n, kind in redis_members().items() if kind == "node"]


def sentinels() -> list[str]:
    return [n for n, kind in redis_members().items() if kind == "sentinel"]


def member_env(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in (services()[name].get("environment") or {}).items()}


def redis_password_file() -> PurePosixPath:
    return PurePosixPath(compose()["x-env"]["MAILYARD_REDIS_PASSWORD_FILE"])


def redis_users() -> list[str]:
    """The Mailyard services that use Redis (MAILYARD_REDIS_URL)."""
    return [n for n, s in mailyard_services().items() if (s.get("environment") or {}).get("MAILYARD_REDIS_URL")]


def test_redis_is_two_data_nodes_and_three_sentinels_each_with_its_own_volume() -> None:
    assert data_nodes() == ["redis-0", "redis-1"] and sentinels() == ["sentinel-1", "sentinel-2", "sentinel-3"]
    assert "redis" not in services()
    assert os.access(REDIS_GROUP_SCRIPT, os.X_OK), "the script is run as redis-group: keep it executable"
    declared, volumes = set(compose()["volumes"]), []
    service_names = set()
    for name, kind in redis_members().items():
        service, env = services()[name], member_env(name)
        assert re.fullmatch(r"\$\{REDIS_IMAGE:-redis:7\.\d+(-alpine)?\}", service["image"]), name
        assert "ports" not in service, f"{name}: Redis is for Mailyard's services only, off the host's ports"
        # Its own named volume for its data (a data node's AOF, a Sentinel's rewritten config)
        volume = mounts(service)["/data"]
        # (redis-0's is the single Redis's volume of the earlier compose file: its data carries over)
        assert volume in declared and volume == ("redis-data" if name == "redis-0" else f"{name}-data"), name
        volumes.append(volume)
        assert f"./deploy/redis-group.sh:{REDIS_GROUP_IN_CONTAINER}:ro" in service["volumes"], name
        # It knows itself and the others by service name, as they reach it
        port = REDIS_PORT if kind == "node" else SENTINEL_PORT
        assert env["MAILYARD_REDIS_SELF"] == f"{name}:{port}", name
        assert env["MAILYARD_REDIS_NODES"].split() == [f"{n}:{REDIS_PORT}" for n in data_nodes()], name
        assert env["MAILYARD_REDIS_SENTINELS"].split() == [f"{s}:{SENTINEL_PORT}" for s in sentinels()], name
        service_names.add(env["MAILYARD_REDIS_SERVICE"])
        assert service.get("restart") == "unless-stopped"
        assert healthcheck_args(service) == ["redis-group", "health", kind], name
    assert len(volumes) == len(set(volumes)) == 5, "each member has a volume of its own"
    assert service_names == {"mailyard"}
    for name in sentinels():
        env = member_env(name)
        assert env["MAILYARD_REDIS_QUORUM"] == "2" and int(env["MAILYARD_SENTINEL_DOWN_AFTER_MS"]) <= 10_000
        assert command(name)[1:] == ["/data/sentinel.conf", "--sentinel"], "its config on its volume"


def test_every_mailyard_service_is_on_the_sentinel_url_and_waits_for_the_sentinels() -> None:
    url = compose()["x-env"]["MAILYARD_REDIS_URL"]
    parsed = redisconn.parse_sentinel(url)
    assert list(parsed.sentinels) == [(s, SENTINEL_PORT) for s in sentinels()]
    assert parsed.service == member_env("redis-0")["MAILYARD_REDIS_SERVICE"] and parsed.db == 0
    assert parsed.password is None and not redisconn.has_password(url), "the password comes from its file"
    # Every Mailyard service of the organization's, none of the Edge's (nor the Internet, nor
    # pki, which makes certificates only)
    assert set(redis_users()) == set(mailyard_services()) - {"internet", "pki", *edge_side()}
    for name in redis_users():
        env = services()[name]["environment"]
        assert env["MAILYARD_REDIS_URL"] == url and redisconn.is_sentinel(env["MAILYARD_REDIS_URL"]), name
        # It starts once the Sentinels see a primary up; on the data nodes it waits for no
        # health (either may be down while the other is primary), but it is stopped first
        depends = services()[name].get("depends_on") or {}
        for sentinel in sentinels():
            assert depends[sentinel]["condition"] == "service_healthy", f"{name} waits for {sentinel}"
        for node in data_nodes():
            assert depends[node]["condition"] == "service_started", f"{name} starts after {node}"
    for name, service in services().items():
        for node in data_nodes():
            condition = (service.get("depends_on") or {}).get(node, {}).get("condition")
            assert condition in (None, "service_started"), f"{name} waits for the health of {node}"


def test_the_members_have_fixed_addresses_that_every_container_has_in_its_hosts_file() -> None:
    # Docker's DNS forgets a stopped container's name and then asks the host's resolvers: a
    # Sentinel or a replica that waited for them would stall. /etc/hosts answers at once.
    hosts = dict(entry.split(":", 1) for entry in compose()["x-redis-hosts"])
    assert list(hosts) == list(redis_members())
    network = compose()["networks"]["default"]["ipam"]["config"][0]
    subnet, dynamic = ipaddress.ip_network(network["subnet"]), ipaddress.ip_network(network["ip_range"])
    assert subnet.is_private and dynamic.subnet_of(subnet)
    # The organization's network is one its Default receive connector trusts
    default = next(c for c in organization().receive_connectors if c.name == "Default")
    assert any(subnet.subnet_of(ipaddress.ip_network(r)) for r in default.remote_ip_ranges if "/" in r)
    for name in redis_members():
        address = ipaddress.ip_address(services()[name]["networks"]["default"]["ipv4_address"])
        assert str(address) == hosts[name] and address in subnet and address not in dynamic, name
        assert services()[name]["extra_hosts"] == compose()["x-redis-hosts"], name
    for name in redis_users():
        assert services()[name]["extra_hosts"] == compose()["x-redis-hosts"], name


def test_redis_is_durable_as_design_2_4_asks() -> None:
    for name in data_nodes():
        args = command(name)
        assert option(args, "--appendonly") == ["yes"]
        assert option(args, "--appendfsync") == ["always"]
        assert option(args, "--save") == [""], "no RDB snapshots"
        assert option(args, "--maxmemory-policy") == ["noeviction"]
        # A primary without a replica refuses writes: nothing acknowledged that one machine holds
        assert option(args, "--min-replicas-to-write") == ["1"]
        assert not option(args, "--replicaof"), f"{name}: the entry point decides its role"


def test_redis_has_a_password_that_is_no_literal_of_the_compose_file() -> None:
    text, script = COMPOSE.read_text(), REDIS_GROUP_SCRIPT.read_text()
    # Never protected mode off, no password on the command line or in the file
    assert not re.search(r"requirepass\s+[\"']?[A-Za-z0-9]", text), "no literal password in docker-compose.yml"
    assert not re.search(r"redis(\+sentinel)?://[^\s/]*:[^\s/@]+@", text), "no password in a URL of docker-compose.yml"
    folder = str(redis_password_file().parent)
    for name in redis_members():
        args = command(name)
        assert "--protected-mode" not in args and "--requirepass" not in args and "--masterauth" not in args
        # redis-server reads the config file the entry point writes (requirepass, masterauth)
        assert args[0] == "redis-server" and args[1].endswith(".conf")
        # The password file is on a volume of its own, every member's to write
        assert mounts(services()[name])[folder] == REDIS_SECRET_VOLUME, name
        assert member_env(name)["MAILYARD_REDIS_PASSWORD_FILE"] == str(redis_password_file()), name
    assert REDIS_SECRET_VOLUME in compose()["volumes"]
    assert "/dev/urandom" in script and "requirepass" in script and "masterauth" in script and "auth-pass" in script
    assert "REDISCLI_AUTH" in script, "redis-cli gets the password from its environment, not its command line"
    # Every Mailyard service that uses Redis reads it there, read-only
    for name in redis_users():
        service = services()[name]
        assert service["environment"]["MAILYARD_REDIS_PASSWORD_FILE"] == str(redis_password_file()), name
        assert f"{REDIS_SECRET_VOLUME}:{folder}:ro" in service["volumes"], f"{name}: mount the password read-only"
        assert "redis://" not in " ".join(command(name)), f"{name}: no Redis URL on a command line"


def run_group_script(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(REDIS_GROUP_SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_members_starting_at_once_generate_one_password(tmp_path: Path) -> None:
    for attempt in range(3):
        folder = tmp_path / f"secret-{attempt}"
        folder.mkdir()
        secret = folder / "password"
        env = {**os.environ, "MAILYARD_REDIS_PASSWORD_FILE": str(secret), "MAILYARD_REDIS_OWNER": ""}
        # As the five members do at their first start, all at once
        procs = [subprocess.Popen(["sh", str(REDIS_GROUP_SCRIPT), "secret"], env={**env, "HOSTNAME": f"m{i}"})
                 for i in range(5)]
        assert [p.wait(timeout=30) for p in procs] == [0] * 5
        password = secret.read_text()
        assert len(password) >= 32 and re.fullmatch(r"[A-Za-z0-9]+", password)
        assert (os.stat(secret).st_mode & 0o777) == 0o600
        assert [p.name for p in folder.iterdir()] == ["password"], "no candidate left behind"
        # A later start keeps it
        assert run_group_script("secret", env=env).returncode == 0 and secret.read_text() == password


def test_the_edges_redis_starts_here_with_a_password_of_its_own(tmp_path: Path) -> None:
    """edge-redis as compose starts it (its entry point, its command), on a loopback port."""
    if shutil.which("redis-cli") is None:
        pytest.skip("no redis-cli on this machine (the health check asks with it)")
    from mailyard.site.redis_server import find_binary

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "docker-entrypoint.sh"  # the image's entry point: here, run the command
    shim.write_text('#!/bin/sh\nexec "$@"\n')
    shim.chmod(0o755)
    port, secret = free_port(), tmp_path / "secret" / "password"
    secret.parent.mkdir()
    env = {**os.environ, **member_env("edge-redis"), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "MAILYARD_REDIS_SELF": f"127.0.0.1:{port}", "MAILYARD_REDIS_PASSWORD_FILE": str(secret),
           "MAILYARD_REDIS_OWNER": ""}
    args = command("edge-redis")
    args[0], args[1] = find_binary(), str(tmp_path / "etc" / PurePosixPath(args[1]).name)
    log = open(tmp_path / "edge-redis.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(["sh", str(REDIS_GROUP_SCRIPT), *services()["edge-redis"]["entrypoint"][1:], *args,
                             "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        kind = services()["edge-redis"]["entrypoint"][1]
        wait_until(lambda: run_group_script("health", kind, env=env).returncode == 0, timeout=30, interval=0.3,
                   message=lambda: (tmp_path / "edge-redis.log").read_text())
        # Its password, generated on its first start, is required, and is in its config (0600)
        password = secret.read_text()
        assert len(password) >= 32 and (os.stat(secret).st_mode & 0o777) == 0o600
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=2).ping()
        r = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2)
        assert r.ping() and r.config_get("appendfsync") == {"appendfsync": "always"}
        assert (os.stat(args[1]).st_mode & 0o777) == 0o600
        # `redis-group cli` asks it with its own password
        assert run_group_script("cli", "-p", str(port), "PING", env=env).stdout.strip() == "PONG"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_the_compose_redis_group_runs_here_fails_over_and_a_node_that_lost_its_data_rejoins(tmp_path: Path) -> None:
    """The five members as processes of this machine's redis-server, started as compose starts
    them (their entry point, their commands), on loopback ports instead of service names."""
    if shutil.which("redis-cli") is None:
        pytest.skip("no redis-cli on this machine (the entry point asks the members with it)")
    from mailyard.site.redis_server import find_binary

    binary = find_binary()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "docker-entrypoint.sh"  # the image's entry point: here, run the command
    shim.write_text('#!/bin/sh\nexec "$@"\n')
    shim.chmod(0o755)
    names = list(redis_members())
    address = {name: f"127.0.0.1:{free_port()}" for name in names}
    secret = tmp_path / "secret" / "password"
    secret.parent.mkdir()
    procs: dict[str, subprocess.Popen] = {}

    def env(name: str) -> dict[str, str]:
        own = member_env(name)
        return {**os.environ, **own, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                "MAILYARD_REDIS_SELF": address[name],
                "MAILYARD_REDIS_NODES": " ".join(address[n] for n in data_nodes()),
                "MAILYARD_REDIS_SENTINELS": " ".join(address[s] for s in sentinels()),
                "MAILYARD_REDIS_DATA": str(tmp_path / name), "MAILYARD_REDIS_OWNER": "",
                "MAILYARD_REDIS_PASSWORD_FILE": str(secret),
                "MAILYARD_SENTINEL_DOWN_AFTER_MS": "3000", "MAILYARD_SENTINEL_FAILOVER_TIMEOUT_MS": "5000"}

    def start(name: str) -> None:
        data = tmp_path / name
        data.mkdir(exist_ok=True)
        args = command(name)
        args[0] = binary
        host, port = split_address(address[name])
        if redis_members()[name] == "node":
            args[1] = str(data / "etc" / PurePosixPath(args[1]).name)
            args += ["--port", str(port), "--bind", host, "--dir", str(data)]
        else:
            args[1] = str(data / PurePosixPath(args[1]).name)
            args += ["--bind", host]
        entrypoint = services()[name]["entrypoint"]
        log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115
        procs[name] = subprocess.Popen(["sh", str(REDIS_GROUP_SCRIPT), *entrypoint[1:], *args], env=env(name),
                                       stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def logs() -> str:
        return "\n".join(f"--- {n}\n{(tmp_path / f'{n}.log').read_text()[-2000:]}" for n in names)

    def client(name: str) -> redis.Redis:
        host, port = split_address(address[name])
        return redis.Redis(host=host, port=port, password=secret.read_text(), socket_timeout=2, decode_responses=True)

    def replication(name: str) -> dict[str, Any]:
        try:
            return client(name).info("replication")
        except redis.RedisError:
            return {}

    def named() -> set[str]:
        out = set()
        for s in sentinels():
            try:
                host, port = client(s).execute_command("SENTINEL", "get-master-addr-by-name", "mailyard")
            except (redis.RedisError, TypeError, ValueError):
                return set()
            out.add(f"{host}:{port}")
        return out

    def healthy(name: str) -> bool:
        return run_group_script("health", redis_members()[name], env=env(name)).returncode == 0

    try:
        # When all five start at once
        for name in names:
            start(name)
        # Then redis-0 is primary, redis-1 its replica, and every member passes its health check
        wait_until(lambda: all(healthy(n) for n in names), timeout=60, interval=0.5, message=logs)
        assert named() == {address["redis-0"]}
        assert replication("redis-1")["master_port"] == split_address(address["redis-0"])[1]
        # And one password protects every member
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=split_address(address["sentinel-2"])[1], socket_timeout=2).ping()
        url = redisconn.sentinel_url([split_address(address[s]) for s in sentinels()], "mailyard", 0,
                                     secret.read_text())
        r = redisconn.connect(url)
        r.set("acknowledged", "mail")
        assert r.execute_command("WAIT", 1, 5000) == 1
        # When redis-0's machine is lost (killed, its data gone) and it starts again at once
        procs.pop("redis-0").kill()
        shutil.rmtree(tmp_path / "redis-0")
        start("redis-0")
        # Then it waits while the Sentinels still name it (an empty primary would erase redis-1)
        wait_until(lambda: "waiting for them to promote a replica" in (tmp_path / "redis-0.log").read_text(),
                   timeout=10, message=logs)
        # And the Sentinels promote redis-1, which it follows as a replica, with the data
        wait_until(lambda: named() == {address["redis-1"]}, timeout=60, interval=0.5, message=logs)
        wait_until(lambda: replication("redis-0").get("master_link_status") == "up", timeout=60, interval=0.5,
                   message=logs)
        assert replication("redis-0")["master_port"] == split_address(address["redis-1"])[1]
        assert client("redis-0").get("acknowledged") == "mail" and r.get("acknowledged") == b"mail"
        wait_until(lambda: all(healthy(n) for n in names), timeout=60, interval=0.5, message=logs)
        # And `redis-group roles` says so
        roles = run_group_script("roles", env=env("sentinel-1")).stdout.splitlines()
        assert roles[:3] == [f"127.0.0.1: primary {address['redis-1']}"] * 3, roles
        assert roles[3:] == [f"127.0.0.1: replica of {address['redis-1']}, link up",
                             "127.0.0.1: primary, 1 replica(s) connected"], roles
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# endregion


def test_a_service_reads_the_redis_password_from_its_file(redis_server, tmp_path: Path) -> None:
    # As compose runs the init service: MAILYARD_REDIS_URL without the password, and the file
    url = redisconn.without_password(redis_server.new_db())
    args = command("init")
    args[2] = str(org_file())
    secret = tmp_path / "password"
    secret.write_text(redis_server.password)
    env = {**mailyard_env(url), "MAILYARD_REDIS_PASSWORD_FILE": str(secret)}
    result = subprocess.run([sys.executable, "-m", "mailyard", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # Without it, Redis refuses, and says so in one line (no traceback, no password)
    result = run_mailyard(args, redis_url=url)
    assert result.returncode == 1 and "refused" in result.stderr and "Traceback" not in result.stderr
    assert "requires a password" in result.stderr and redis_server.password not in result.stderr
    # A file that cannot be read is named
    env["MAILYARD_REDIS_PASSWORD_FILE"] = str(tmp_path / "missing")
    result = subprocess.run([sys.executable, "-m", "mailyard", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "cannot read the Redis password file" in result.stderr, result.stderr


def test_restart_policies_health_checks_dependencies_and_stop_grace_are_in_place() -> None:
    assert one_shots() == ["edge-import", "edge-subscribe", "init", "pki"]
    for name, service in services().items():
        if name in one_shots():
            # It runs once; its dependents wait for it to complete
            depends = {s: d["condition"] for s, d in (service.get("depends_on") or {}).items()}
            redis_up = {**dict.fromkeys(data_nodes(), "service_started"), **dict.fromkeys(sentinels(), "service_healthy")}
            if name == "init":
                assert depends == redis_up
            if name == "edge-import":  # (the organization applied, its CA made, the Edge's file written)
                assert depends == {**redis_up, **dict.fromkeys(["init", "pki", "edge-subscribe"],
                                                               "service_completed_successfully")}
            if name in ("pki", "edge-subscribe"):
                assert not depends, f"{name} needs nothing but its volumes"
            continue
        # A process that exits (a crash, Redis gone longer than its reconnections) is started again.
        assert service.get("restart") in ("unless-stopped", "always"), f"{name}: restart policy"
        health = service.get("healthcheck") or {}
        assert health.get("test") and not health.get("disable"), f"{name}: health check"
    for name in [*services_running("hub"), *services_running("mailbox", "serve"), "viewer"]:
        assert services()[name]["depends_on"]["init"]["condition"] == "service_completed_successfully", name
    # The Edge starts once it is subscribed (it gets healthy once a hub has pushed to it)
    assert services()["edge"]["depends_on"]["edge-import"]["condition"] == "service_completed_successfully"
    # A hub is healthy when its worker answers and its receive connectors accept connections.
    task_time_limit = make_app("redis://127.0.0.1:1/0").conf.task_time_limit
    for name in services_running("hub"):
        assert healthcheck_args(services()[name]) == ["mailyard", "health", "hub"], name
    # The Edge is healthy when its receive connector greets, where it listens
    port = split_address(one(command("edge-subscribe"), "--smtp-listen"))[1]
    assert healthcheck_args(services()["edge"]) == ["mailyard", "health", "smtp", f"127.0.0.1:{port}"]
    # Hubs and the Edge (its transport is a hub's pipeline)
    for name in [*services_running("hub"), "edge"]:
        grace = seconds(services()[name]["stop_grace_period"])
        # A warm shutdown waits for running tasks; none runs longer than task_time_limit.
        assert grace > task_time_limit, f"{name}: stop_grace_period {grace}s <= task_time_limit {task_time_limit}s"


def dockerfile_stages() -> list[tuple[str, str, str]]:
    """(name, FROM, body) of each stage of deploy/Dockerfile, in order (BASE_IMAGE's default
    substituted; an unnamed stage is named by its index)."""
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    parts = re.split(r"^FROM\s+", text, flags=re.M)[1:]
    out = []
    for i, part in enumerate(parts):
        head, _, body = part.partition("\n")
        words = head.split()
        base = re.sub(r"^\$\{(\w+)\}$", lambda m: args.get(m.group(1), m.group(0)), words[0])
        name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(i)
        out.append((name, base, body))
    return out


def stage_chain(target: str) -> list[tuple[str, str, str]]:
    """The stages TARGET is made of, itself last (FROM an earlier stage, FROM that one's...)."""
    stages = {name: (name, base, body) for name, base, body in dockerfile_stages()}
    chain = [stages[target]]
    while chain[0][1] in stages:
        chain.insert(0, stages[chain[0][1]])
    return chain


def effective(target: str, instruction: str) -> str | None:
    """The last INSTRUCTION (USER, ENTRYPOINT...) that holds in TARGET's image."""
    found = None
    for _, _, body in stage_chain(target):
        for value in re.findall(rf"^{instruction}\s+(.+)$", body, re.M):
            found = value.strip()
    return found


def test_the_dockerfile_builds_small_non_root_images_of_the_package() -> None:
    text = DOCKERFILE.read_text()
    stages = dockerfile_stages()
    names = [name for name, _, _ in stages]
    # Every stage is FROM the BASE_IMAGE build argument (by default an official slim Python) or
    # FROM an earlier stage
    for i, (name, base, _) in enumerate(stages):
        assert re.match(r"python:3\.1[1-9]-slim", base) or base in names[:i], (name, base)
    # The default target (the last stage) is the one init builds: `docker build` without a
    # target gives mailyard:dev
    assert names[-1] == BUILDERS["init"][1]
    for target in {t for _, t in BUILDERS.values()}:
        chain = stage_chain(target)
        # Only the virtualenv of the build stage: no pip, no build tools in the image
        assert "pip install" not in "".join(body for _, _, body in chain), f"{target}: pip runs in the build stage only"
        user = effective(target, "USER")
        assert user and user not in ("root", "0"), f"{target} runs as a non-root user"
        assert effective(target, "ENTRYPOINT") == '["mailyard"]', target
    # mailyard:dev installs nothing from apt; the Edge's image adds Debian's rspamd (unless the
    # base image has it: deploy/docker-engine.sh's local one, built where no mirror is reachable
    # from a build), and nothing else
    assert "apt-get" not in "".join(body for _, _, body in stage_chain(BUILDERS["init"][1]))
    edge_only = stage_chain(BUILDERS["rspamd"][1])[-1][2]
    installs = re.findall(r"apt-get install[^\n]*?((?:\s+[\w.+-]+)+)\s*(?:\\|&&|\))", edge_only)
    assert [pkgs.split()[-1] for pkgs in installs] == ["rspamd"], installs
    assert "command -v rspamd" in edge_only
    assert re.search(r"pip install \.(\s|$)", text) and "pip install -e" not in text
    for folder in ("core", "hub", "mailbox", "submission", "edge"):  # pyproject's package-dir
        assert re.search(rf"^COPY {folder}\b", text, re.M), f"the image needs {folder}/"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "var", "tests"} <= set(ignored)
    # One service builds each image (each build of its own would give each service an image of
    # its own, and `up --scale` would recreate them); the others never pull it from a registry.
    builders = {name: service["build"] for name, service in services().items() if "build" in service}
    assert {n: (services()[n]["image"], b.get("target")) for n, b in builders.items()} == BUILDERS
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    for build in builders.values():
        assert build["context"] == "." and build["dockerfile"] == "deploy/Dockerfile"
        # The compose file's default base image is the Dockerfile's.
        assert build["args"] == {"BASE_IMAGE": "${BASE_IMAGE:-" + args["BASE_IMAGE"] + "}"}
    for name, service in mailyard_services().items():
        assert service.get("pull_policy") == "never", f"{name}: never pull {service['image']} from a registry"
    assert services_running("edge", "rspamd") == [n for n, s in services().items() if s["image"] == EDGE_IMAGE]
    for name in [*redis_members(), *edge_redis_services()]:
        assert re.fullmatch(r"\$\{REDIS_IMAGE:-redis:7\.\d+(-alpine)?\}", services()[name]["image"]), name


# endregion
# region: the same topology as processes


@pytest.fixture(scope="module")
def local_site(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`mailyard site up --hubs 3 --no-edge` on this machine, with the tests' Redis: the hubs
    with the file's Internet connectors (their round robin and their health checks)."""
    data_dir = tmp_path_factory.mktemp("site")
    url = redis_server.new_db()
    log = open(data_dir / "runner.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailyard", "site", "up", "--config", str(org_file()), "--hubs", "3",
         "--concurrency", "1", "--free-ports", "--no-flower", "--no-internet", "--no-edge", "--redis-url", url, "--data-dir", str(data_dir)],
        cwd=ROOT, env=mailyard_env(), stdout=log, stderr=subprocess.STDOUT,
    )

    def ready() -> dict[str, Any] | None:
        assert proc.poll() is None, (data_dir / "runner.log").read_text()[-3000:]
        try:
            state = json.loads((data_dir / "site.json").read_text())
        except (OSError, ValueError):
            return None
        return state if state.get("ready") else None

    try:
        state = wait_until(ready, timeout=120, interval=0.2,
                           message=lambda: (data_dir / "runner.log").read_text()[-3000:])
        yield {"state": state, "redis_url": url, "r": redisconn.connect(url), "data_dir": data_dir}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def send(site: dict[str, Any], sender: str, to: str, subject: str) -> None:
    """Send as the site's local operator (its logon in secrets.toml), over TLS to the server."""
    data_dir, r = site["data_dir"], site["r"]
    operator = tomllib.loads((data_dir / "secrets.toml").read_text())["operator"]
    server = next(m.server for m in organization().mailboxes if m.address == sender)
    with httpx.Client(verify=pki.trust_context(data_dir / "pki" / "ca.crt"), timeout=30,
                      auth=(operator["user"], operator["password"])) as client:
        response = client.post(f"{registry.server_url(r, server)}/mailboxes/{sender}/outbox",
                               json={"to": [to], "subject": subject, "body": "round robin"},
                               extensions=pki.sni(pki.Identity.mailbox(server)))
    assert response.status_code == 202, response.text


def processes(state: dict[str, Any], role_name: str, site: str | None = None) -> list[dict[str, Any]]:
    return [p for p in state["processes"] if p["role"] == role_name and (site is None or p.get("site") == site)]


@pytest.mark.slow
def test_site_up_with_three_hubs_round_robins_over_all_three_amsterdam_hubs(local_site) -> None:
    r, state = local_site["r"], local_site["state"]
    amsterdam = organization().sites[0]
    hubs = sorted(p["name"] for p in processes(state, "hub", amsterdam.name))
    assert len(hubs) == 3
    sender = next(m.address for m in organization().mailboxes if m.server == amsterdam.mailbox_servers[0])
    to = next(m.address for m in organization().mailboxes if m.server in amsterdam.mailbox_servers
              and m.address != sender)

    def picked_up() -> Counter:
        return Counter(rec.server for rec in tracking.search(r, event="RECEIVE")
                       if rec.source == "STOREDRIVER" and rec.subject in subjects)

    # When an Amsterdam mailbox sends nine messages, each once the one before was picked up
    # (each then gets a kick of its own: mail that comes while one is pending goes with it)
    subjects: set[str] = set()
    for i in range(9):
        subjects.add(f"compose round robin {i}")
        send(local_site, sender, to, f"compose round robin {i}")
        wait_until(lambda: sum(picked_up().values()) == len(subjects), timeout=60,
                   message=lambda: f"picked up: {dict(picked_up())}")

    # Then each of the three hubs picked some of them up from the Outbox (store driver RECEIVE)
    counts = picked_up()
    assert sorted(counts) == hubs, f"pickups per hub: {dict(counts)}"


@pytest.mark.slow
def test_the_health_commands_judge_the_running_site(local_site) -> None:
    url, state = local_site["redis_url"], local_site["state"]
    for site in organization().sites:
        hub = processes(state, "hub", site.name)[0]
        result = run_mailyard(["health", "hub", "--name", hub["name"]], redis_url=url)
        assert result.returncode == 0 and result.stdout.startswith("healthy: "), result.stdout + result.stderr
        for connector in ("Default", "Internet", "Client"):
            assert connector in result.stdout
    result = run_mailyard(["health", "hub", "--name", "no-such-hub", "--timeout", "1"], redis_url=url)
    assert result.returncode == 1 and result.stdout.startswith("unhealthy: ") and len(result.stdout.splitlines()) == 1

    mailbox = processes(state, "mailbox")[0]
    where = ["--server", mailbox["name"], "--data-dir", str(local_site["data_dir"])]
    result = run_mailyard(["health", "mailbox", "--url", mailbox["url"], *where])
    assert result.returncode == 0 and mailbox["name"] in result.stdout, result.stdout
    other = next(p["name"] for p in processes(state, "mailbox") if p["name"] != mailbox["name"])
    result = run_mailyard(["health", "mailbox", "--url", mailbox["url"], "--server", other,
                           "--data-dir", str(local_site["data_dir"]), "--timeout", "2"])
    assert result.returncode == 1 and "mismatch" in result.stdout, "another server's name: its certificate says no"
    result = run_mailyard(["health", "mailbox", "--url", f"https://127.0.0.1:{free_port()}", *where, "--timeout", "2"])
    assert result.returncode == 1 and result.stdout.startswith("unhealthy: "), result.stdout

    viewer = processes(state, "viewer")[0]
    result = run_mailyard(["health", "http", viewer["url"].rstrip("/") + "/health"])
    assert result.returncode == 0, result.stdout


@pytest.mark.slow
def test_mailyard_flower_shows_every_hub_node(local_site) -> None:
    port = free_port()
    secrets_dir = local_site["data_dir"] / "flower"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailyard", "flower", "--address", "127.0.0.1", "--port", str(port),
         "--secrets-dir", str(secrets_dir)],  # as compose runs it
        cwd=ROOT, env=mailyard_env(local_site["redis_url"]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def logon() -> tuple[str, str] | None:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            path = secrets_dir / "secrets.toml"
            flower = tomllib.loads(path.read_text()).get("flower") if path.exists() else None
            return (flower["user"], flower["password"]) if flower else None

        user_password = wait_until(logon, timeout=30)

        def workers() -> set[str]:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            try:
                response = httpx.get(f"{base}/api/workers", params={"refresh": "1"}, timeout=10, auth=user_password)
            except httpx.ConnectError:
                return set()
            return set(response.json()) if response.status_code == 200 else set()

        wanted = {f"hub@{p['name']}" for p in processes(local_site["state"], "hub")}
        # Its pages and REST API answer only with the logon it generated; every hub is its own node.
        wait_until(lambda: wanted <= workers(), timeout=60, interval=0.5,
                   message=lambda: f"Flower shows {sorted(workers())}, wanted {sorted(wanted)}")
        for path in ("/", "/api/workers"):
            assert httpx.get(base + path, timeout=10).status_code == 401, path
        assert httpx.post(f"{base}/api/worker/shutdown/hub@x", timeout=10).status_code == 401
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# endregion
# region: the demo Internet as compose runs it


def test_internet_serve_with_one_mx_address_for_every_domain(tmp_path: Path) -> None:
    dns_port, smtp_port, mx = free_port(), free_port("127.0.0.9"), "127.0.0.9"
    folder = tmp_path / "internet"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailyard", "internet", "serve", "--dns", f"127.0.0.1:{dns_port}",
         "--mx-address", mx, "--smtp-port", str(smtp_port), "--dir", str(folder)],
        cwd=ROOT, env=mailyard_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: run_mailyard(["health", "smtp", f"{mx}:{smtp_port}"]).returncode == 0, timeout=30, interval=PROCESS_POLL,
                   message=lambda: proc.stderr.read().decode() if proc.poll() is not None and proc.stderr else "")
        # Every demo domain's MX host is the one address
        resolver = make_resolver("127.0.0.1", dns_port)
        for domain in ("fabrikam.example", "tailspintoys.example", "wingtiptoys.example"):
            exchange = resolver.resolve(domain, "MX")[0].exchange.to_text()
            assert [a.to_text() for a in resolver.resolve(exchange, "A")] == [mx]
        # And the one sink there keeps mail for each of them, by domain
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "erin@contoso.com", "grace@fabrikam.example", "out"
        msg.set_content("hello")
        with smtplib.SMTP(mx, smtp_port, timeout=10) as client:
            client.send_message(msg, to_addrs=["grace@fabrikam.example", "ivan@wingtiptoys.example"])
        # `internet send --server` hands a message to a given SMTP server, without Redis
        result = run_mailyard(["internet", "send", "--from", "grace@fabrikam.example", "--to",
                               "jo@tailspintoys.example", "--subject", "direct", "--server", f"{mx}:{smtp_port}",
                               "--source", "127.0.0.1"])
        assert result.returncode == 0, result.stderr
        for domain in ("fabrikam.example", "wingtiptoys.example", "tailspintoys.example"):
            wait_until(lambda d=domain: list((folder / d).glob("*.eml")), timeout=10, message=domain)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# endregion
