"""The Queue Viewer's Prometheus endpoint: its values match the queues (Get-Queue) and the
counters of the mail that went through a running cluster."""

from __future__ import annotations

import re
import smtplib
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailyard import keys
from mailyard.redisconn import text_map
from mailyard.testing.cluster import Cluster, Proc
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT, make_org

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def viewer_url(cluster: Cluster, proc: Proc) -> str:
    def printed() -> str | None:
        if not proc.alive:
            raise AssertionError(f"{proc.name} exited: {cluster.tail(proc.name)}")
        found = re.search(r"Queue Viewer: (http://127\.0\.0\.1:\d+)/", proc.log.read_text(errors="replace"))
        return found.group(1) if found else None

    url = wait_until(printed, timeout=30, message=lambda: cluster.tail(proc.name))
    wait_until(lambda: httpx.get(url + "/health", timeout=5).status_code == 200, timeout=30)
    return url


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(redis_server.new_db(), tmp_path_factory.mktemp("metrics"), make_org(), cwd=ROOT)
    try:
        cluster.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
        hub = cluster.start_hub("Amsterdam", "met-1", wait=False)
        viewer = cluster._spawn("viewer", "viewer", ["viewer", "--port", "0"], None)
        cluster.wait_hub(hub)
        cluster.metrics_url = viewer_url(cluster, viewer) + "/metrics"  # type: ignore[attr-defined]
        yield cluster
    finally:
        cluster.close()


def scrape(site: Cluster) -> Samples:
    response = httpx.get(site.metrics_url, timeout=10)  # type: ignore[attr-defined]
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        assert family.name.startswith("mailyard_"), family.name
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def of(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def queue_rows(site: Cluster) -> list[dict]:
    from mailyard.hub.queue_rows import queue_rows as rows

    return rows(site.r)


def test_metrics_match_the_queues_and_the_counters(site: Cluster) -> None:
    s = uuid.uuid4().hex[:8]
    site.send("alice@contoso.com", ["bob@contoso.com", "carol@contoso.com"], subject=f"two {s}")
    site.send("dave@contoso.com", ["alice@contoso.com"], subject=f"one {s}")
    site.send("alice@contoso.com", ["nobody@contoso.com"], subject=f"bounce {s}")
    site.send("alice@contoso.com", ["erin@contoso.com"], subject=f"to London {s}")  # no London hub runs
    site.wait_for_subject("bob@contoso.com", f"two {s}")
    site.wait_for_subject("carol@contoso.com", f"two {s}")
    site.wait_for_subject("alice@contoso.com", f"one {s}")
    site.wait_for_subject("alice@contoso.com", f"Undeliverable: bounce {s}")
    wait_until(lambda: any(q["identity"] == "Amsterdam\\London" and q["message_count"] == 1 and q["last_error"]
                           for q in queue_rows(site)), timeout=30, message="erin's copy never waited")
    for _ in range(2):  # two SMTP sessions on the Default connector
        host, port = site.smtp("met-1")
        with smtplib.SMTP(host, port, local_hostname="metrics.test", timeout=15) as client:
            client.ehlo()

    # The counters (fresh database: these are all the mail it carried)
    def counted() -> Samples | None:
        samples = scrape(site)
        sessions = value(samples, "mailyard_smtp_sessions_total", hub="met-1", connector="Default")
        defers = value(samples, "mailyard_recipients_total", event="DEFER", queue="Amsterdam\\London")
        return samples if sessions == 2 and defers else None

    samples = wait_until(counted, timeout=30, message=lambda: str(scrape(site)))
    deliveries = of(samples, "mailyard_recipients_total")
    assert value(samples, "mailyard_recipients_total", event="DELIVER", queue="Amsterdam\\MBX-AMS-01") == 3  # bob, alice, the NDR
    assert value(samples, "mailyard_recipients_total", event="DELIVER", queue="Amsterdam\\MBX-AMS-02") == 1  # carol
    assert sum(v for labels, v in deliveries.items() if ("event", "FAIL") in labels) == 1  # nobody@
    assert value(samples, "mailyard_messages_received_total", source="STOREDRIVER") == 4
    assert value(samples, "mailyard_ndrs_total") == 1
    # ...each one exactly the site's counter in Redis
    stats = {k: int(v) for k, v in text_map(site.r.hgetall(keys.STATS)).items()}
    for labels, count in deliveries.items():
        d = dict(labels)
        assert stats[f"{d['event']}|{d['queue']}"] == count, (d, stats)

    # The queue gauges are Get-Queue's rows (read together until a moment when nothing moved)
    def queues_agree() -> bool:
        rows = queue_rows(site)
        gauges = of(scrape(site), "mailyard_queue_messages")
        expected = {tuple(sorted({"queue": q["identity"], "site": q["site"], "delivery_type": q["delivery_type"],
                                  "status": q["status"]}.items())): q["message_count"] for q in rows}
        return gauges == expected and rows == queue_rows(site)

    wait_until(queues_agree, timeout=30, message=lambda: f"{queue_rows(site)}\n{scrape(site)}")
    identities = {q["identity"] for q in queue_rows(site)}
    assert {"Amsterdam\\Submission", "Amsterdam\\MBX-AMS-01", "Amsterdam\\MBX-AMS-02",
            "Amsterdam\\London"} <= identities

    # The oldest message's age: erin's copy in the London relay queue; 0 for empty queues
    before = time.time()
    samples = scrape(site)
    ((_, entered),) = site.r.zrange(keys.queue_members("Amsterdam\\London"), 0, 0, withscores=True)
    age = value(samples, "mailyard_queue_oldest_message_age_seconds", queue="Amsterdam\\London")
    assert age is not None and before - entered / 1000 - 1 <= age <= time.time() - entered / 1000 + 1
    assert value(samples, "mailyard_queue_oldest_message_age_seconds", queue="Amsterdam\\MBX-AMS-02") == 0
    assert set(of(samples, "mailyard_queue_oldest_message_age_seconds")) == {(("queue", q),) for q in identities}

    assert value(samples, "mailyard_hubs_alive", site="Amsterdam") == 1
    assert value(samples, "mailyard_hubs_alive", site="London") == 0

    # After more mail, the counters move on
    site.send("dave@contoso.com", ["bob@contoso.com"], subject=f"again {s}")
    site.wait_for_subject("bob@contoso.com", f"again {s}")
    wait_until(lambda: value(scrape(site), "mailyard_recipients_total", event="DELIVER",
                             queue="Amsterdam\\MBX-AMS-01") == 4, timeout=30)
    assert value(scrape(site), "mailyard_messages_received_total", source="STOREDRIVER") == 5


def test_the_exposition_is_prometheus_text_with_types_and_help(site: Cluster) -> None:
    text = httpx.get(site.metrics_url, timeout=10).text  # type: ignore[attr-defined]
    for name, kind in (("mailyard_queue_messages", "gauge"), ("mailyard_queue_oldest_message_age_seconds", "gauge"),
                       ("mailyard_recipients_total", "counter"), ("mailyard_messages_received_total", "counter"),
                       ("mailyard_ndrs_total", "counter"), ("mailyard_smtp_sessions_total", "counter"),
                       ("mailyard_hubs_alive", "gauge")):
        family = rf"(?:{name.removesuffix('_total')}|{name})"  # prometheus_client names counters either way
        assert re.search(rf"^# TYPE {family} {kind}$", text, re.M), name
        assert re.search(rf"^# HELP {family} \S", text, re.M), name
    # a queue identity's backslash is escaped as the format requires, and parses back
    assert 'queue="Amsterdam\\\\MBX-AMS-01"' in text


def test_back_pressure_is_a_metric_per_site_and_resource(site: Cluster) -> None:
    from mailyard.hub.pressure import Level

    samples = scrape(site)  # (every site of the organization, its level Normal without a sweeper's)
    assert value(samples, "mailyard_back_pressure", site="Amsterdam") == Level.NORMAL
    for resource in ("Memory", "SubmissionQueue", "Backlog"):
        assert value(samples, "mailyard_back_pressure_resource", site="Amsterdam", resource=resource) == 0


def test_every_alert_rule_in_deploy_asks_for_metrics_and_labels_the_viewer_serves(site: Cluster) -> None:
    import yaml

    site.send("alice@contoso.com", ["bob@contoso.com"], subject="for the counters")
    wait_until(lambda: of(scrape(site), "mailyard_recipients_total"), timeout=60)
    served: dict[str, set[str]] = {}
    for (name, labels), _ in scrape(site).items():
        served.setdefault(name, set()).update(k for k, _ in labels)
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {"MailyardQueueOld", "MailyardNoHubAlive", "MailyardBackPressureHigh",
                                           "MailyardDeferralRate"}
    for rule in rules:
        names = set(re.findall(r"\bmailyard_[a-z_]+", rule["expr"]))
        assert names, rule["alert"]
        for name in names:
            assert name in served, f"{rule['alert']} asks for {name}, which /metrics does not serve"
        used = set(re.findall(r"\$labels\.(\w+)", " ".join(rule["annotations"].values())))
        used |= {label for group in re.findall(r"by \(([^)]*)\)", rule["expr"]) for label in group.split(",")}
        used = {label.strip() for label in used}
        offered = set.union(*(served[n] for n in names))
        assert used <= offered, f"{rule['alert']} uses labels {used - offered} that {names} do not have"
        assert rule["labels"]["severity"] in {"warning", "critical"} and rule["for"]
