"""Edge Subscription and EdgeSync (mailyard.edgesync), with a real hub, a real Edge on its own
Redis, and the CLI on both sides: the subscription file's secret expires, recipients cross only
as salted hashes, the Edge never connects to the organization's Redis, a change applied with
``org apply`` reaches the Edge with the next sync, and only the site's hubs may push."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mailyard import edgesync, keys, pki
from mailyard.org import Mailbox
from mailyard.testing.cluster import Cluster
from mailyard.testing.edge import EdgeNode, remote_ports
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT, make_org

pytestmark = pytest.mark.slow  # (real processes: handed out first, see tests/conftest.py)

DEADLINE = 60.0


def org_cli(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "mailyard", "org", "edge", *args, "--data-dir", str(cluster.data_dir)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**cluster._env(None)})
    if check and done.returncode != 0:
        raise AssertionError(f"mailyard org edge {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done


@pytest.fixture
def org_site(redis_server: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    org = make_org(edge_sync_config_interval=2, edge_sync_recipient_interval=2)
    cluster = Cluster(redis_server.new_db(), tmp_path / "org", org, cwd=ROOT)
    try:
        cluster.start_hub("Amsterdam", "hub-ams-1")
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[EdgeNode]:
    node = EdgeNode(tmp_path / "edge", cwd=ROOT)
    try:
        yield node
    finally:
        node.stop()


def synced(edge: EdgeNode) -> dict:
    return wait_until(lambda: (s := edge.status())["recipients_at"] and s["config_at"] and s, timeout=DEADLINE,
                      message=lambda: f"no EdgeSync came: {edge.tail()}")


def test_a_subscription_file_whose_secret_expired_is_refused(org_site: Cluster, edge: EdgeNode, tmp_path: Path) -> None:
    file = edge.subscribe(tmp_path / "edge.json", valid="2m")
    assert file.stat().st_mode & 0o777 == 0o600, "the file holds the bootstrap secret"
    data = json.loads(file.read_text())
    data["effective"] -= 3 * 60  # the file, three minutes later
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    refused = org_cli(org_site, "import", str(old), "--site", "Amsterdam", check=False)
    assert refused.returncode == 1 and "expired" in refused.stderr, refused.stderr
    assert not org_site.r.exists(keys.edge_bootstrap(edge.name))


def test_an_edge_refuses_a_bootstrap_after_its_own_secret_expired(org_site: Cluster, edge: EdgeNode,
                                                                  tmp_path: Path) -> None:
    file = edge.subscribe(tmp_path / "edge.json", valid="2m")
    # Imported in time on the organization's side; on the Edge, the two minutes are over
    home = edge.data_dir / "edge" / "edge.json"
    config = json.loads(home.read_text())
    config["bootstrap"]["expires"] = time.time() - 1
    home.write_text(json.dumps(config))
    edge.start()
    org_cli(org_site, "import", str(file), "--site", "Amsterdam")

    def refused() -> str:
        listed = json.loads(org_cli(org_site, "list", "--json").stdout)
        return listed[0]["error"] or ""
    error = wait_until(refused, timeout=DEADLINE, message=lambda: org_site.tail("hub-ams-1"))
    assert "refused /edgesync/bootstrap (403)" in error, error
    assert edge.status()["subscribed"] is False
    assert not (edge.data_dir / "pki" / "ca.crt").exists(), "the Edge took the organization's CA"


def test_edgesync_gives_the_edge_hashes_of_recipients_and_the_edge_never_reaches_the_organizations_redis(
        org_site: Cluster, edge: EdgeNode, tmp_path: Path) -> None:
    file = edge.subscribe(tmp_path / "edge.json")
    edge.start()
    done = org_cli(org_site, "import", str(file), "--site", "Amsterdam")
    assert "subscribed Edge EDGE-01 to site Amsterdam" in done.stdout, done.stdout
    status = synced(edge)
    assert status["subscribed"] and status["site"] == "Amsterdam"
    org = org_site.org
    addresses = edgesync.external_recipients(org)
    assert status["recipients"] == len(addresses) > 0
    salt = json.loads(file.read_text())["recipient_salt"]
    r = edge.r
    for address in ("bob@contoso.com", "alice@contoso.com"):
        assert r.sismember(keys.EDGE_RECIPIENTS, edgesync.recipient_hash(salt, address)), address
    # No address is anywhere in the Edge's Redis in clear
    dump = b"".join(k + (r.dump(k) or b"") for k in r.scan_iter(count=1000))
    assert b"bob@contoso.com" not in dump and b"alice@contoso.com" not in dump
    assert status["accepted_domains"] == list(org.accepted_domains)
    assert status["send_connectors"][0] == "EdgeSync - Inbound to Amsterdam"
    assert "EdgeSync - Amsterdam to Internet" in status["send_connectors"]
    # The organization's side: the subscription, bootstrapped, the secret gone
    listed = json.loads(org_cli(org_site, "list", "--json").stdout)
    assert listed[0]["bootstrapped"] and listed[0]["error"] is None and listed[0]["secret_expires_in"] is None
    assert not org_site.r.exists(keys.edge_bootstrap(edge.name))
    # The Edge's processes hold no connection to the organization's Redis
    org_port = int(org_site.redis_url.rsplit(":", 1)[1].split("/")[0])
    assert org_port not in remote_ports(edge.pids()), "the Edge is connected to the organization's Redis"


def test_a_recipient_added_with_org_apply_reaches_the_edge_with_the_next_sync(org_site: Cluster, edge: EdgeNode,
                                                                               tmp_path: Path) -> None:
    file = edge.subscribe(tmp_path / "edge.json")
    edge.start()
    org_cli(org_site, "import", str(file), "--site", "Amsterdam")
    synced(edge)
    salt = json.loads(file.read_text())["recipient_salt"]
    new = "zoe@contoso.com"
    assert not edge.r.sismember(keys.EDGE_RECIPIENTS, edgesync.recipient_hash(salt, new))
    server = org_site.org.mailboxes[0].server
    org = org_site.org.model_copy(update={"mailboxes": [*org_site.org.mailboxes, Mailbox(address=new, server=server)]})
    org_site.apply(org)  # (an `org apply` of a file without the subscription: it is kept)
    wait_until(lambda: edge.r.sismember(keys.EDGE_RECIPIENTS, edgesync.recipient_hash(salt, new)), timeout=DEADLINE,
               message=lambda: f"the new recipient did not reach the Edge: {org_site.tail('hub-ams-1')}")
    assert [e["name"] for e in json.loads(org_cli(org_site, "list", "--json").stdout)] == [edge.name]
    # and `org edge sync --wait` pushes at once
    done = org_cli(org_site, "sync", "--wait", "30")
    assert "synchronized EDGE-01" in done.stdout, done.stdout


def test_only_the_sites_hubs_may_push_and_a_hub_talks_only_to_the_pinned_edge(org_site: Cluster, edge: EdgeNode,
                                                                               tmp_path: Path) -> None:
    file = edge.subscribe(tmp_path / "edge.json")
    edge.start()
    org_cli(org_site, "import", str(file), "--site", "Amsterdam")
    synced(edge)
    sub = next(e for e in org_site.org.__class__.from_json(org_site.r.get(keys.ORG)).edge_subscriptions)
    url = f"https://{sub.sync}{edgesync.RECIPIENTS_PATH}"
    body = edgesync.RecipientsPush(hashes=[], generated_at=0).model_dump_json()

    def post(cert: pki.Identity | None) -> httpx.Response:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cadata=sub.certificate)
        ctx.check_hostname = False
        if cert is not None:
            node = org_site.pki.issue(cert)
            ctx.load_cert_chain(node.cert_path, node.key_path)
        with httpx.Client(verify=ctx, trust_env=False) as client:
            return client.post(url, content=body)
    assert post(None).status_code == 401
    refused = post(pki.Identity.hub("London"))
    assert refused.status_code == 403 and "only hubs of site Amsterdam" in refused.json()["error"]
    assert post(pki.Identity.mailbox("MBX-AMS-01")).status_code == 403
    assert edge.status()["recipients"] > 0, "a refused push changed nothing"
    # An impostor at the Edge's address, with another certificate: the hub sends it nothing
    edge.stop()
    from tests.edge.impostor import Impostor
    with Impostor(sub.sync) as impostor:
        org_cli(org_site, "sync")
        error = wait_until(lambda: (e := json.loads(org_cli(org_site, "list", "--json").stdout)[0]["error"])
                           and "did not present the certificate" in e and e, timeout=DEADLINE,
                           message=lambda: org_site.tail("hub-ams-1"))
        assert impostor.requests == 0, f"the hub sent the impostor something: {error}"


def test_the_edge_hears_of_a_hub_that_started_at_once_not_at_the_next_interval(org_site: Cluster, edge: EdgeNode,
                                                                               tmp_path: Path) -> None:
    file = edge.subscribe(tmp_path / "edge.json")
    edge.start()
    org_cli(org_site, "import", str(file), "--site", "Amsterdam")
    synced(edge)
    # The intervals long: only a change of the hubs can make the next push
    transport = org_site.org.transport.model_copy(update={"edge_sync_config_interval": 3600,
                                                          "edge_sync_recipient_interval": 3600})
    org_site.apply(org_site.org.model_copy(update={"transport": transport}))
    wait_until(lambda: len(edge.status()["hubs"]) == 1 and org_site.r.hget(keys.edge_sync(edge.name), "hubs"),
               timeout=DEADLINE, message=lambda: f"no push after the apply: {edge.tail()}")
    before = edge.status()["config_at"]
    org_site.start_hub("Amsterdam", "hub-ams-2")  # (on ports of its own: a hub started again elsewhere)
    hubs = wait_until(lambda: len(h := edge.status()["hubs"]) == 2 and h, timeout=DEADLINE,
                      message=lambda: f"the Edge does not know the second hub: {edge.status()}")
    assert edge.status()["config_at"] > before and len(set(hubs)) == 2


def test_a_deployments_first_start_subscribes_once_by_names_and_then_does_nothing(org_site: Cluster, edge: EdgeNode,
                                                                                 tmp_path: Path) -> None:
    # As docker compose runs it: the hubs reach the Edge by a name, the Edge listens on an address
    file = tmp_path / "handover" / "EDGE-01.json"
    file.parent.mkdir()
    first = ["subscribe", "--name", edge.name, "--smtp", f"localhost:{edge.smtp_port}",
             "--smtp-listen", f"127.0.0.1:{edge.smtp_port}", "--sync", f"localhost:{edge.sync_port}",
             "--sync-listen", f"127.0.0.1:{edge.sync_port}", "--file", str(file), "--unless-subscribed"]
    edge.cli(*first)
    importing = ["import", str(file), "--site", "Amsterdam", "--unless-subscribed", "--remove-file"]
    assert "subscribed Edge EDGE-01" in org_cli(org_site, *importing).stdout
    assert not file.exists(), "the file with the bootstrap secret was left behind"
    edge.start()
    status = synced(edge)
    assert (status["smtp"], status["sync"]) == (f"localhost:{edge.smtp_port}", f"localhost:{edge.sync_port}")
    edge.wait_smtp()  # (it listens on 127.0.0.1, where EdgeNode looks)
    # The next start: nothing to do on either side, and nothing changes
    assert "nothing to do" in edge.cli(*first).stdout and not file.exists()
    assert "nothing to do" in org_cli(org_site, *importing).stdout
    assert edge.status()["subscribed"] and [e["name"] for e in json.loads(org_cli(org_site, "list", "--json").stdout)
                                            ] == [edge.name]
