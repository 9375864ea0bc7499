"""The operator's console in headless Chromium, against a running site of two hubs: the front
page draws the mail flow and it moves when mail flows; the queue shape table; a hub's page
with its receive connectors and the sessions open on them; a hub killed shows as dead; the
connectors page. A screenshot of the front page is saved as a test artifact
(build/artifacts/queue-viewer.png), the one the README shows."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT, make_org
from tests.hub.test_viewer_browser import CHROMIUM, TOKEN, browser, downloads, log_on, logged_off, viewer_url

__all__ = ["browser", "downloads"]  # (fixtures this module uses from the viewer's tests)

ARTIFACTS = ROOT / "build" / "artifacts"
CAROL_QUEUE = "Amsterdam\\MBX-AMS-02"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium "
                                 "chromium-driver); CI installs it")]


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(redis_server.new_db(), tmp_path_factory.mktemp("console"), make_org(), cwd=ROOT)
    try:
        cluster.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
        hubs = [cluster.start_hub("Amsterdam", name, wait=False) for name in ("con-1", "con-2")]
        viewer = cluster._spawn("viewer", "viewer", ["viewer", "--port", "0", "--token", TOKEN], None)
        for hub in hubs:
            cluster.wait_hub(hub)
        cluster.viewer_url = viewer_url(cluster, viewer)  # type: ignore[attr-defined]
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def page(site: Cluster, browser: WebDriver) -> WebDriver:
    logged_off(site, browser)
    log_on(browser, TOKEN)
    wait_until(lambda: summary(browser).get("delivered") is not None, timeout=30,
               message="the flow never drew")
    return browser


def summary(driver: WebDriver) -> dict[str, int]:
    found = driver.find_elements(By.ID, "flow-summary")
    if not found:
        return {}
    data = driver.execute_script("return Object.assign({}, arguments[0].dataset)", found[0])
    return {k: int(v) for k, v in data.items()}


def cells(driver: WebDriver, selector: str) -> list[list[str]]:
    return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in driver.find_elements(By.CSS_SELECTOR, selector)]


def canvas_drawn(driver: WebDriver, chart: str) -> bool:
    """Whether the chart's canvas has anything on it (uPlot draws on a <canvas>)."""
    return bool(driver.execute_script("""
        const c = document.querySelector(arguments[0] + ' canvas');
        if (!c || !c.width) return false;
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        for (let i = 3; i < px.length; i += 4) if (px[i]) return true;
        return false;""", chart))


def test_the_front_page_draws_the_flow_and_it_moves_when_mail_flows(site: Cluster, page: WebDriver) -> None:
    before = summary(page)
    for n in range(3):
        site.send("alice@contoso.com", ["carol@contoso.com"], subject=f"console {n}")
    after = wait_until(lambda: (s := summary(page)) and s["delivered"] >= before["delivered"] + 3 and s,
                       timeout=60, message=lambda: f"the picture did not move: {summary(page)}")
    assert after["received"] >= before["received"] + 3
    assert canvas_drawn(page, "#flow-rates") and canvas_drawn(page, "#flow-depth"), "the charts are blank"
    hops = wait_until(lambda: {row[0]: row for row in cells(page, "#flow-hops tbody tr")}.get(CAROL_QUEUE),
                      timeout=30, message="no row for the next hop")
    assert int(hops[1]) >= 3, hops
    legend = page.find_element(By.CSS_SELECTOR, "#flow-rates .u-legend").text
    assert "delivered" in legend and "deferred" in legend and "failed" in legend, legend
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "queue-viewer.png"
    assert page.save_screenshot(str(shot)) and shot.stat().st_size > 10_000, shot


def test_the_queue_shape_table_counts_by_age(site: Cluster, page: WebDriver) -> None:
    heads = wait_until(lambda: [th.text for th in page.find_elements(By.CSS_SELECTOR, "#shape thead th")],
                       timeout=30)
    assert heads == ["Queue", "T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
    assert cells(page, "#shape tbody tr")[0][0] == "TOTAL"
    page.find_element(By.CSS_SELECTOR, "#shape-by option[value=domain]").click()
    wait_until(lambda: page.find_element(By.CSS_SELECTOR, "#shape thead th").text == "Domain", timeout=30)


def test_a_hub_page_shows_its_connectors_and_the_sessions_open_on_them(site: Cluster, page: WebDriver) -> None:
    page.find_element(By.CSS_SELECTOR, 'a.hub[data-hub="con-1"]').click()
    wait_until(lambda: page.find_element(By.ID, "hub-name").text == "con-1", timeout=15)
    state = wait_until(lambda: page.find_element(By.ID, "hub-state").text, timeout=30)
    assert state.startswith("alive"), state
    facts = dict(zip([e.text for e in page.find_elements(By.CSS_SELECTOR, "#hub-facts dt")],
                     [e.text for e in page.find_elements(By.CSS_SELECTOR, "#hub-facts dd")], strict=True))
    assert facts["Site"] == "Amsterdam" and facts["Concurrency"] == "2" and facts["Back pressure"] == "Normal", facts

    def sessions() -> str:
        return page.find_element(By.CSS_SELECTOR, '#hub-connectors tr[data-connector="Default"] td.sessions').text

    assert wait_until(sessions, timeout=30) == "0"
    host, port = site.smtp("con-1")
    with smtplib.SMTP(host, port, local_hostname="console.test", timeout=30) as client:
        client.ehlo()
        wait_until(lambda: sessions() == "1", timeout=30, message=lambda: f"sessions shown: {sessions()}")
    wait_until(lambda: sessions() == "0", timeout=30, message="the closed session is still counted")


def test_a_killed_hub_is_shown_dead(site: Cluster, page: WebDriver) -> None:
    site.kill("con-2")
    wait_until(lambda: "dead" in page.find_element(By.CSS_SELECTOR, 'a.hub[data-hub="con-2"]').get_attribute("class"),
               timeout=60, message="the chip still shows con-2 alive")
    page.find_element(By.CSS_SELECTOR, 'a.hub[data-hub="con-2"]').click()
    wait_until(lambda: page.find_element(By.ID, "hub-state").get_attribute("data-alive") == "no", timeout=30)
    assert page.find_element(By.ID, "hub-state").text.startswith("dead: silent for")


def test_the_connectors_page_lists_the_organizations_connectors(site: Cluster, page: WebDriver) -> None:
    page.find_element(By.CSS_SELECTOR, 'nav.views a[data-view="connectors"]').click()
    receive = wait_until(lambda: {row[0]: row for row in cells(page, "#receive-connectors tbody tr")}, timeout=30)
    send = {row[0]: row for row in cells(page, "#send-connectors tbody tr")}
    assert {c.name for c in site.org.receive_connectors} == set(receive), receive
    assert {c.name for c in site.org.send_connectors} == set(send), send
    assert not page.find_element(By.ID, "queues-section").is_displayed(), "the queues belong to the other view"
    page.find_element(By.CSS_SELECTOR, 'nav.views a[data-view="overview"]').click()
    wait_until(lambda: page.find_element(By.ID, "flow-section").is_displayed(), timeout=15)

