"""A page of another site, in headless Chromium, can neither send from a mailbox nor read
one, even when the browser holds the user's logon for the mailbox server (it logged on
there before): a "simple" cross-origin POST (text/plain, a form) is refused before anything
is read, a JSON or authorized one needs a CORS preflight the server never grants, and a read
gives the page nothing. Chromium ignores certificate errors here, so that TLS (the
organization's CA, which no browser trusts by default) is not what stops it."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from mailyard import registry
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT, make_org

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ALICE = "alice@contoso.com"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium "
                                "chromium-driver); CI installs it")

ATTACKER_PAGE = b"""<!doctype html><html><body><h1>cute cats</h1>
<form id="f" method="POST" enctype="text/plain" target="sink"><input name="To: bob@contoso.com&#10;&#10;x" value="y"></form>
<iframe name="sink"></iframe></body></html>"""


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(redis_server.new_db(), tmp_path_factory.mktemp("xsite"), make_org(), cwd=ROOT)
    try:
        cluster.start_mailbox("MBX-AMS-01")
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def attacker() -> Iterator[str]:
    """The other site: a page on another loopback origin."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(ATTACKER_PAGE)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--ignore-certificate-errors",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def outbox(site: Cluster) -> int:
    return len(site.folder(ALICE, "Outbox")) + len(site.folder(ALICE, "Sent Items"))


ATTACKS = """
const [base, done] = [arguments[0], arguments[arguments.length - 1]];
const box = base + '/mailboxes/alice@contoso.com';
const raw = 'To: bob@contoso.com\\r\\nSubject: forged\\r\\n\\r\\nsent by another site\\r\\n';
const out = {};
async function attempt(name, url, init) {
  try { const r = await fetch(url, init); out[name] = {type: r.type, status: r.status, body: await r.text()}; }
  catch (e) { out[name] = {error: String(e)}; }
}
await attempt('simple_post', box + '/outbox', {method: 'POST', mode: 'no-cors', credentials: 'include',
  headers: {'Content-Type': 'text/plain'}, body: raw});
await attempt('rfc822_post', box + '/outbox', {method: 'POST', credentials: 'include',
  headers: {'Content-Type': 'message/rfc822'}, body: raw});
await attempt('json_post', box + '/outbox', {method: 'POST', credentials: 'include',
  headers: {'Content-Type': 'application/json'}, body: JSON.stringify({to: ['bob@contoso.com'], subject: 'forged'})});
await attempt('read', box + '/folders/Inbox', {credentials: 'include'});
await attempt('read_no_cors', box + '/folders/Inbox', {mode: 'no-cors', credentials: 'include'});
const form = document.getElementById('f');
form.action = box + '/outbox';
form.submit();
done(out);
"""


def test_a_page_of_another_site_can_neither_send_nor_read(site, attacker, browser) -> None:
    base = registry.server_url(site.r, "MBX-AMS-01")
    user, password = "alice%40contoso.com", "alice-demo-password"
    # The user logged on to the mailbox server in this browser: Chromium now holds the logon
    # for that origin and would send it along with requests other pages make.
    browser.get(base.replace("https://", f"https://{user}:{password}@") + f"/mailboxes/{ALICE}/folders/Inbox")
    assert '"mailbox":"alice@contoso.com"' in browser.page_source.replace(" ", "")
    before = outbox(site)

    browser.get(attacker + "/")
    out = browser.execute_async_script(ATTACKS, base)

    for name in ("rfc822_post", "json_post", "read"):
        assert "error" in out[name], f"{name}: the page got an answer it may not have: {out[name]}"
    for name in ("simple_post", "read_no_cors"):
        assert out[name].get("type") == "opaque" and out[name]["body"] == "", f"{name}: {out[name]}"
    # give the form and every request the time to land, then count: nothing was queued
    wait_until(lambda: browser.execute_script("return document.readyState") == "complete", timeout=15)
    with site.client(auth=("alice@contoso.com", password)) as alice:
        probe = alice.post(f"{base}/mailboxes/{ALICE}/outbox", content=b"x", headers={"Content-Type": "text/plain"})
        assert probe.status_code == 415, "the server refuses what a form can send, even logged on"
    assert outbox(site) == before, "a page of another site sent mail as alice"
