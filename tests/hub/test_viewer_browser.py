"""The Queue Viewer page in headless Chromium, against a running cluster whose viewer has a
token: a person logs on through the page's form; the queues are there, live; Suspend and
Resume by clicking change the status; a queue opens to its messages, which can be acted on
and exported; a bad filter shows where it is wrong. Without the token (or with a wrong one)
the page shows the logon form and no queue data."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from mailyard.testing.cluster import Cluster, Proc
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT, make_org

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CAROL_QUEUE = "Amsterdam\\MBX-AMS-02"
TOKEN = "browser-test-viewer-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium "
                                "chromium-driver); CI installs it")



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
    cluster = Cluster(redis_server.new_db(), tmp_path_factory.mktemp("browser"), make_org(), cwd=ROOT)
    try:
        cluster.start_mailboxes(["MBX-AMS-01", "MBX-AMS-02"])
        hub = cluster.start_hub("Amsterdam", "web-1", wait=False)
        viewer = cluster._spawn("viewer", "viewer", ["viewer", "--port", "0", "--token", TOKEN], None)
        cluster.wait_hub(hub)
        cluster.send("alice@contoso.com", ["carol@contoso.com"], subject="first")
        cluster.wait_for_subject("carol@contoso.com", "first")
        cluster.viewer_url = viewer_url(cluster, viewer)  # type: ignore[attr-defined]
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, downloads: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        yield driver
    finally:
        driver.quit()


def logged_off(site: Cluster, browser: WebDriver) -> WebDriver:
    """The page, loaded afresh in a tab that holds no token."""
    browser.get(site.viewer_url + "/")  # type: ignore[attr-defined]
    browser.execute_script("sessionStorage.clear()")
    browser.get(site.viewer_url + "/")  # type: ignore[attr-defined]
    wait_until(lambda: browser.find_element(By.ID, "logon").is_displayed(), timeout=15,
               message="the page did not ask for the token")
    return browser


def log_on(browser: WebDriver, token: str) -> None:
    box = browser.find_element(By.ID, "logon-token")
    box.clear()
    box.send_keys(token)
    browser.find_element(By.ID, "logon-submit").click()


@pytest.fixture
def page(site: Cluster, browser: WebDriver) -> WebDriver:
    """The page, logged on through its form."""
    logged_off(site, browser)
    log_on(browser, TOKEN)
    wait_until(lambda: row(browser, CAROL_QUEUE), timeout=15, message="the queue table never filled")
    assert not browser.find_element(By.ID, "logon").is_displayed()
    return browser


def css(identity: str) -> str:
    return identity.replace("\\", "\\\\")


def row(driver: WebDriver, identity: str):  # type: ignore[no-untyped-def]
    found = driver.find_elements(By.CSS_SELECTOR, f'#queues tr[data-queue="{css(identity)}"]')
    return found[0] if found else None


def status(driver: WebDriver, identity: str) -> str:
    return row(driver, identity).find_element(By.CSS_SELECTOR, "td.status").text


def click(driver: WebDriver, selector: str) -> None:
    """Click what the selector finds, again if a refresh replaced it meanwhile."""
    def clicked() -> bool:
        driver.find_element(By.CSS_SELECTOR, selector).click()
        return True
    wait_until(clicked, timeout=10, message=f"cannot click {selector}")


def api_status(site: Cluster, identity: str) -> str:
    rows = httpx.get(site.viewer_url + "/api/queues", headers=AUTH, timeout=10).json()  # type: ignore[attr-defined]
    return next(q["status"] for q in rows if q["identity"] == identity)


def act(site: Cluster, action: str, queue: str = CAROL_QUEUE) -> None:
    response = httpx.post(site.viewer_url + "/api/queues/actions",  # type: ignore[attr-defined]
                          json={"action": action, "queues": [queue]}, headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text


def test_the_page_shows_the_queues_of_the_running_site_live(site: Cluster, page: WebDriver) -> None:
    headers = [th.text for th in page.find_elements(By.CSS_SELECTOR, "#queues thead th")]
    assert headers[:7] == ["Identity", "DeliveryType", "Status", "MessageCount", "NextHopDomain", "LastError",
                           "NextRetryTime"]
    # (read afresh each time: a refresh may replace a row's cells, and replaces the hub list)
    def carol() -> tuple[str, str, str]:
        found = row(page, CAROL_QUEUE)
        return tuple(found.find_element(By.CSS_SELECTOR, f"td.{name}").text  # type: ignore[return-value]
                     for name in ("identity", "delivery-type", "status"))

    identity, delivery_type, shown = wait_until(carol, timeout=10)
    assert (identity, delivery_type) == (CAROL_QUEUE, "MapiDelivery") and shown in ("Ready", "Active")
    assert row(page, "Amsterdam\\Submission") is not None
    hub = wait_until(lambda: page.find_element(By.CSS_SELECTOR, '#hubs [data-hub="web-1"]').text, timeout=10)
    assert hub.startswith("web-1")
    # live: the "updated" clock moves on by itself
    first = wait_until(lambda: re.fullmatch(r"updated \d\d:\d\d:\d\d", page.find_element(By.ID, "updated").text)
                       and page.find_element(By.ID, "updated").text, timeout=10)
    wait_until(lambda: page.find_element(By.ID, "updated").text != first, timeout=10,
               message="the page did not refresh by itself")
    # a queue that appears is shown without reloading the page
    site.send("alice@contoso.com", ["bob@contoso.com"], subject="new queue")
    wait_until(lambda: row(page, "Amsterdam\\MBX-AMS-01"), timeout=15, message="the new queue never appeared")


def test_suspend_and_resume_a_queue_by_clicking(site: Cluster, page: WebDriver) -> None:
    try:
        click(page, f'#queues tr[data-queue="{css(CAROL_QUEUE)}"] button[data-action="suspend"]')
        wait_until(lambda: status(page, CAROL_QUEUE) == "Suspended", timeout=10,
                   message=lambda: f"status shown: {status(page, CAROL_QUEUE)}")
        assert api_status(site, CAROL_QUEUE) == "Suspended"
        badge = row(page, CAROL_QUEUE).find_element(By.CSS_SELECTOR, "td.status .badge")
        assert "s-suspended" in badge.get_attribute("class")
        assert "Suspended" in page.find_element(By.ID, "notice").text

        click(page, f'#queues tr[data-queue="{css(CAROL_QUEUE)}"] button[data-action="resume"]')
        wait_until(lambda: status(page, CAROL_QUEUE) != "Suspended", timeout=10)
        assert api_status(site, CAROL_QUEUE) != "Suspended"
        assert row(page, CAROL_QUEUE).find_elements(By.CSS_SELECTOR, 'button[data-action="suspend"]')
    finally:
        act(site, "resume")


def test_open_a_queue_and_act_on_its_messages(site: Cluster, page: WebDriver, downloads: Path) -> None:
    act(site, "suspend")
    try:
        s = f"held {uuid.uuid4().hex[:8]}"
        site.send("alice@contoso.com", ["carol@contoso.com"], subject=s)
        wait_until(lambda: row(page, CAROL_QUEUE).find_element(By.CSS_SELECTOR, "td.count").text == "1",
                   timeout=15, message="the message count never showed 1")
        click(page, f'#queues tr[data-queue="{css(CAROL_QUEUE)}"] a.open')
        assert page.find_element(By.ID, "messages-queue").text == CAROL_QUEUE

        def message_row():  # type: ignore[no-untyped-def]
            for tr in page.find_elements(By.CSS_SELECTOR, "#messages tbody tr[data-message]"):
                if tr.find_element(By.CSS_SELECTOR, "td.subject").text == s:
                    return tr
            return None

        tr = wait_until(message_row, timeout=15, message="the message never showed")
        identity = tr.get_attribute("data-message")
        assert identity.startswith(CAROL_QUEUE + "\\")
        assert tr.find_element(By.CSS_SELECTOR, "td.from").text == "alice@contoso.com"
        assert tr.find_element(By.CSS_SELECTOR, "td.status").text == "Ready"
        recipient = tr.find_element(By.CSS_SELECTOR, 'li[data-recipient="carol@contoso.com"]')
        assert "Ready" in recipient.text

        selector = f'#messages tr[data-message="{css(identity)}"]'
        click(page, f'{selector} button[data-action="suspend"]')
        wait_until(lambda: message_row().find_element(By.CSS_SELECTOR, "td.status").text == "Suspended", timeout=10)
        # Export: the page fetches it with the token and saves it as a file
        click(page, f'{selector} button[data-action="export"]')

        def saved() -> bytes | None:
            for path in downloads.glob("*.eml"):
                content = path.read_bytes()
                if f"Subject: {s}".encode() in content:
                    return content
            return None

        wait_until(saved, timeout=15, message=lambda: f"no export saved: {sorted(downloads.iterdir())}")

        click(page, f'{selector} button[data-action="remove-silent"]')
        alert = wait_until(lambda: page.switch_to.alert, timeout=5, message="no confirmation before removing")
        assert "Remove" in alert.text and identity in alert.text
        alert.accept()
        wait_until(lambda: message_row() is None, timeout=10, message="the removed message is still shown")
        assert "Removed without NDR" in page.find_element(By.ID, "notice").text
        rows = httpx.get(site.viewer_url + "/api/messages", params={"queue": CAROL_QUEUE},  # type: ignore
                         headers=AUTH).json()
        assert s not in [m["subject"] for m in rows]
    finally:
        act(site, "resume")


def test_the_buttons_follow_the_queue_kind_never_the_end_of_its_name(page: WebDriver) -> None:
    def queue_buttons(identity: str, kind: str, delivery_type: str, status: str = "Ready") -> list[str]:
        q = {"identity": identity, "kind": kind, "delivery_type": delivery_type, "status": status}
        return page.execute_script("return queueButtons(arguments[0]).map(b => b.dataset.action)", q)

    def message_buttons(queue: str, kind: str, status: str = "Ready") -> list[str]:
        m = {"identity": f"{queue}\\42", "queue": queue, "queue_kind": kind, "status": status, "message_id": ""}
        return page.execute_script("return messageButtons(arguments[0]).map(b => b.dataset.action)", m)

    # a next hop that happens to be called Poison, Submission or Unreachable is a delivery queue
    for name in ("Poison", "Submission", "Unreachable"):
        assert queue_buttons(f"Amsterdam\\{name}", "delivery", "DnsConnectorDelivery") == ["suspend", "retry"]
        assert message_buttons(f"Amsterdam\\{name}", "delivery") == ["suspend", "remove", "remove-silent"]
    # and the kinds, whatever the queue is called
    assert queue_buttons("Amsterdam\\Held", "poison", "Undefined", "Suspended") == []
    assert queue_buttons("Amsterdam\\Nowhere", "unreachable", "Unreachable") == ["suspend", "resubmit"]
    assert queue_buttons("Amsterdam\\Intake", "submission", "Undefined") == ["suspend", "retry"]
    assert message_buttons("Amsterdam\\Intake", "submission") == ["remove", "remove-silent"], "not suspendable"
    assert message_buttons("Amsterdam\\Held", "poison")[:1] == ["resume"], "held by its queue's kind"


def test_a_bad_filter_shows_the_error_under_the_bad_part(page: WebDriver) -> None:
    box = page.find_element(By.ID, "queue-filter")
    box.clear()
    box.send_keys("Status -eq Bogus\n")
    error = page.find_element(By.ID, "queue-filter-error")
    wait_until(lambda: error.is_displayed() and "^" in error.text, timeout=10, message="no filter error shown")
    lines = error.get_attribute("textContent").split("\n")
    assert lines[1].strip() == "Status -eq Bogus" and lines[1][lines[2].index("^"):].startswith("Bogus")

    box.clear()
    box.send_keys("Identity -like '*MBX-AMS-02'\n")
    wait_until(lambda: not error.is_displayed(), timeout=10)
    wait_until(lambda: [tr.get_attribute("data-queue") for tr in page.find_elements(By.CSS_SELECTOR, "#queues tbody tr")]
               == [CAROL_QUEUE], timeout=10, message="the filter did not apply")
    page.find_element(By.ID, "queue-filter-clear").click()
    wait_until(lambda: len(page.find_elements(By.CSS_SELECTOR, "#queues tbody tr")) > 1, timeout=10)


def shows_no_queue_data(page: WebDriver) -> None:
    assert page.find_element(By.ID, "logon").is_displayed()
    assert not page.find_element(By.ID, "main").is_displayed()
    assert page.find_elements(By.CSS_SELECTOR, "#queues tbody tr") == []
    assert page.find_elements(By.CSS_SELECTOR, "#messages tbody tr") == []
    assert page.find_elements(By.CSS_SELECTOR, "#hubs [data-hub]") == []
    text = page.find_element(By.TAG_NAME, "body").text
    assert "MBX-AMS-02" not in text and "Submission" not in text and "web-1" not in text


def test_without_the_token_the_page_shows_no_queue_data(site: Cluster, browser: WebDriver) -> None:
    page = logged_off(site, browser)
    message = page.find_element(By.ID, "logon-message")
    wait_until(lambda: "needs its token" in message.text, timeout=10, message=lambda: message.text)
    wait_until(lambda: page.find_element(By.ID, "updated").text == "not logged on", timeout=10)
    shows_no_queue_data(page)

    # A wrong token (the demo's placeholder) is refused, clearly, and still shows nothing.
    log_on(page, "contoso-demo-viewer-token")
    wait_until(lambda: "refused this token" in message.text, timeout=10, message=lambda: message.text)
    shows_no_queue_data(page)
    assert page.execute_script("return sessionStorage.length") == 0, "a refused token is not kept"

    # The right one: in, and kept for this tab (a reload needs no new logon) until logging off.
    log_on(page, TOKEN)
    wait_until(lambda: row(page, CAROL_QUEUE), timeout=15, message="the queue table never filled")
    page.refresh()
    wait_until(lambda: row(page, CAROL_QUEUE), timeout=15, message="the reloaded page lost its logon")
    assert not page.find_element(By.ID, "logon").is_displayed()
    click(page, "#logoff")
    wait_until(lambda: page.find_element(By.ID, "logon").is_displayed(), timeout=10)
    shows_no_queue_data(page)
    assert page.execute_script("return sessionStorage.length") == 0
