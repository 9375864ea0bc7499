"""Thousands of SMTP sessions against one receive process: its memory must not grow with them.

3000 sessions (valid mail, refused envelopes, garbage, AUTH garbage, TLS with and without a
handshake, overlong lines, clients that vanish in the middle of DATA), 8 at a time from
several source addresses, against the Default and Internet connectors of one hub. The
receive process's RSS (VmRSS) is read after a warm-up and after every further 500 sessions;
its growth after the warm-up must stay under a generous bound, and every session must have
been answered as the protocol says.
"""

from __future__ import annotations

import base64
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from mailyard.testing.cluster import Cluster
from mailyard.testing.waiting import wait_until
from tests.conftest import make_org
from tests.hostile.helpers import RawSession, ServerClosed, alive, receive_pid, rss_kb, running_site

WARM_UP = 500
SESSIONS = 3000
CONCURRENCY = 8
MAX_GROWTH_KB = 40 * 1024
INTERNET_SOURCES = [f"127.0.0.{i}" for i in range(2, 2 + CONCURRENCY)]


@pytest.fixture(scope="module")
def site(redis_server, tmp_path_factory):
    with running_site(redis_server, tmp_path_factory.mktemp("memory"), make_org(),
                      mailboxes=["MBX-AMS-01"]) as cluster:
        yield cluster


def lines(s: RawSession, *commands: bytes) -> list[int]:
    codes = []
    for command in commands:
        s.send(command)
        codes.append(s.reply().code)
    return codes


def valid_mail(s: RawSession, n: int) -> str:
    codes = lines(s, b"EHLO client.example\r\n", b"MAIL FROM:<sender@fabrikam.example>\r\n",
                  b"RCPT TO:<bob@contoso.com>\r\n", b"DATA\r\n")
    assert codes == [250, 250, 250, 354], codes
    s.send(b"Subject: memory %d\r\n\r\n" % n + b"line of the body\r\n" * 20 + b".\r\n")
    assert s.reply().code == 250
    assert lines(s, b"QUIT\r\n") == [221]
    return "delivered"


def refused_envelope(s: RawSession, n: int) -> str:
    codes = lines(s, b"EHLO client.example\r\n", b"MAIL FROM:<spam@example.org>\r\n",
                  b"RCPT TO:<friend@fabrikam.example>\r\n", b"RCPT TO:<nobody@contoso.com>\r\n", b"DATA\r\n",
                  b"RSET\r\n", b"QUIT\r\n")
    assert codes == [250, 250, 550, 550, 503, 250, 221], codes
    return "refused"


def garbage(s: RawSession, n: int) -> str:
    s.send(b"EHLO client.example\r\n" + b"".join(b"X%d \x00\xff garbage\r\n" % i for i in range(6)))
    replies = s.expect_closed()  # five unknown commands end the session
    assert replies[-1].code == 502, replies
    return "garbage"


def auth_garbage(s: RawSession, n: int) -> str:
    codes = lines(s, b"EHLO client.example\r\n", b"AUTH PLAIN !!!\r\n", b"AUTH CRAM-MD5\r\n", b"AUTH LOGIN\r\n",
                  b"QUIT\r\n")
    assert codes[0] == 250 and all(c >= 500 for c in codes[1:4]) and codes[4] == 221, codes
    return "auth garbage"


def tls_session(s: RawSession, n: int) -> str:
    assert lines(s, b"EHLO client.example\r\n", b"STARTTLS\r\n") == [250, 220]
    s.starttls()
    codes = lines(s, b"EHLO client.example\r\n",
                  b"AUTH PLAIN " + base64.b64encode(b"\0alice@contoso.com\0wrong") + b"\r\n", b"QUIT\r\n")
    assert codes[0] == 250 and codes[-1] == 221, codes
    return "tls"


def tls_garbage(s: RawSession, n: int) -> str:
    assert lines(s, b"EHLO client.example\r\n", b"STARTTLS\r\n") == [250, 220]
    s.send(b"\x16\x03\x01\x00\x05hello, this is no handshake" * 3)
    s.half_close()
    s.expect_closed()
    return "tls garbage"


def overlong(s: RawSession, n: int) -> str:
    s.send(b"EHLO client.example\r\nMAIL FROM:<" + b"a" * 5000 + b"@example.org>\r\n")
    assert s.reply().code == 250 and s.reply().code == 500
    s.send(b"NOOP " + b"z" * 70_000)  # over the 64 KB cap without a line break: the server closes
    s.expect_closed()
    return "overlong"


def vanish_in_data(s: RawSession, n: int) -> str:
    codes = lines(s, b"EHLO client.example\r\n", b"MAIL FROM:<sender@fabrikam.example>\r\n",
                  b"RCPT TO:<bob@contoso.com>\r\n", b"DATA\r\n")
    assert codes == [250, 250, 250, 354], codes
    s.send(b"Subject: half\r\n\r\n" + b"never finished\r\n" * 200)
    return "vanished"  # closed without the final dot


def anonymous_on_default(s: RawSession, n: int) -> str:
    codes = lines(s, b"EHLO client.example\r\n", b"MAIL FROM:<alice@contoso.com>\r\n", b"RCPT TO:<bob@contoso.com>\r\n",
                  b"QUIT\r\n")
    assert codes == [250, 530, 503, 221], codes
    return "refused on Default"


def connect_and_leave(s: RawSession, n: int) -> str:
    return "connect only"


KINDS = [valid_mail, refused_envelope, garbage, auth_garbage, tls_session, tls_garbage, overlong, vanish_in_data,
         anonymous_on_default, connect_and_leave]


def one_session(site_ports: dict[str, tuple[str, int]], n: int) -> str:
    kind = KINDS[n % len(KINDS)]
    default = kind is anonymous_on_default
    source = "127.0.0.1" if default else INTERNET_SOURCES[n % len(INTERNET_SOURCES)]
    s = RawSession.open(site_ports["Default" if default else "Internet"], source, timeout=15)
    try:
        greeting = s.reply()
        if greeting.code == 421:  # too many connections from this source: a fair answer, counted
            return "421 at connect"
        assert greeting.code == 220, greeting
        return kind(s, n)
    except ServerClosed as exc:
        raise AssertionError(f"session {n} ({kind.__name__}) closed unexpectedly: {exc}\n{s.dump()}") from None
    finally:
        s.close()


@pytest.mark.slow
def test_thousands_of_sessions_do_not_grow_the_receive_process(site: Cluster) -> None:
    pid = receive_pid(site)
    ports = {c: site.smtp("rx-1", c) for c in ("Default", "Internet")}
    kinds: Counter[str] = Counter()
    figures: list[tuple[int, int, float]] = [(0, rss_kb(pid), 0.0)]
    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        done = 0
        for checkpoint in [WARM_UP, *range(WARM_UP + 500, SESSIONS + 1, 500)]:
            kinds.update(pool.map(lambda n: one_session(ports, n), range(done, checkpoint)))
            done = checkpoint
            figures.append((done, rss_kb(pid), time.monotonic() - started))
    elapsed = time.monotonic() - started
    print(f"\n{SESSIONS} sessions in {elapsed:.1f}s ({SESSIONS / elapsed:.0f}/s), {CONCURRENCY} at a time: "
          + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    for count, rss, at in figures:
        print(f"  after {count:5d} sessions ({at:5.1f}s): receive RSS {rss / 1024:6.1f} MB")
    warm = figures[1][1]
    growth = figures[-1][1] - warm
    print(f"  growth after the warm-up: {growth / 1024:+.1f} MB (bound {MAX_GROWTH_KB / 1024:.0f} MB)")

    assert alive(pid) and receive_pid(site) == pid, "the receive process died or was restarted"
    assert growth < MAX_GROWTH_KB, f"the receive process grew by {growth} kB over {SESSIONS - WARM_UP} sessions"
    assert kinds["421 at connect"] < SESSIONS // 100, kinds
    # every message that got 250 arrives (and the process is still serving)
    delivered = kinds["delivered"]
    wait_until(lambda: sum(1 for i in site.folder("bob@contoso.com") if i["subject"].startswith("memory "))
               >= delivered, timeout=60, message=f"{delivered} messages in bob's Inbox")
