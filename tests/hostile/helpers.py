"""Shared pieces of the hostile-input suite: a raw SMTP client that checks every reply line it
reads, the receive process of a hub, and its memory."""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mailyard.hub.receive_listener import ENTRY_POINT
from mailyard.org import Organization
from mailyard.testing.cluster import Cluster
from mailyard.testing.redis_server import RedisServer
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT

# One reply line: a code, a separator and printable text (RFC 5321 §4.2: textstring is
# HT and printable US-ASCII; our replies never use HT).
REPLY_LINE = re.compile(rb"([2-5][0-9]{2})([ -])([\x20-\x7e]*)\r\n")
# The enhanced status code (RFC 3463) every 4xx and 5xx reply must start its text with; its
# class must be the reply's (a 4xx carries 4.x.x, a 5xx carries 5.x.x).
ENHANCED = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}(?: |$)")

INTERNET_SOURCE = "127.0.0.2"  # matches the Internet connector; 127.0.0.1 matches Default


class ServerClosed(Exception):
    """The server closed the connection (EOF or reset)."""


class Hung(AssertionError):
    """The server neither answered nor closed within the timeout."""


@dataclass
class Reply:
    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        return self.lines[-1]

    def __str__(self) -> str:
        return " | ".join(f"{self.code} {t}" for t in self.lines)


def check_reply_line(raw: bytes) -> tuple[int, bool, str]:
    """(code, is last line, text) of one reply line; AssertionError if it is malformed."""
    m = REPLY_LINE.fullmatch(raw)
    assert m, f"malformed reply line {raw!r}"
    code, text = int(m.group(1)), m.group(3).decode("ascii")
    if code >= 400:
        enhanced = ENHANCED.match(text)
        assert enhanced, f"{code} reply without an enhanced status code: {raw!r}"
        assert enhanced.group(1) == str(code)[0], f"enhanced status class differs from the code: {raw!r}"
    return code, m.group(2) == b" ", text


@dataclass
class RawSession:
    """An SMTP client that sends bytes as they are and checks every reply line it reads."""

    sock: socket.socket
    timeout: float = 10.0
    buf: bytes = b""
    transcript: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, address: tuple[str, int], source: str = "127.0.0.1", timeout: float = 10.0) -> RawSession:
        sock = socket.create_connection(address, timeout=timeout, source_address=(source, 0))
        return cls(sock, timeout)

    def send(self, data: bytes) -> bool:
        """False if the server had closed the connection."""
        self.transcript.append(f">> {data[:120]!r}{'...' if len(data) > 120 else ''} ({len(data)} bytes)")
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            return False

    def _line(self) -> bytes:
        deadline = time.monotonic() + self.timeout
        while b"\n" not in self.buf:
            if time.monotonic() > deadline:
                raise Hung(f"no reply within {self.timeout}s\n" + self.dump())
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise Hung(f"no reply within {self.timeout}s\n" + self.dump()) from None
            except (ConnectionResetError, ssl.SSLError) as exc:
                raise ServerClosed(repr(exc)) from None
            if not chunk:
                raise ServerClosed("EOF" + (f" after a partial line {self.buf!r}" if self.buf else ""))
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def reply(self) -> Reply:
        """The next complete reply (all its lines); every line is checked."""
        lines, code = [], None
        while True:
            raw = self._line()
            try:
                this, last, text = check_reply_line(raw)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{self.dump()}") from None
            assert code is None or this == code, f"multi-line reply changed its code: {raw!r}\n{self.dump()}"
            code = this
            lines.append(text)
            if last:
                reply = Reply(code, lines)
                self.transcript.append(f"<< {reply}")
                return reply

    def expect_closed(self) -> list[Reply]:
        """Read (and check) whatever replies remain until the server closes the connection."""
        replies = []
        while True:
            try:
                replies.append(self.reply())
            except ServerClosed:
                return replies

    def starttls(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        assert not self.buf, f"plaintext after 220 to STARTTLS: {self.buf!r}"
        self.sock = ctx.wrap_socket(self.sock)
        self.transcript.append("== TLS")

    def half_close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def dump(self) -> str:
        return "session:\n  " + "\n  ".join(self.transcript[-40:])


def command(address: tuple[str, int], lines: list[bytes], source: str = "127.0.0.1") -> list[Reply]:
    """Greeting plus one reply per line, in lock step; the connection is closed afterwards."""
    s = RawSession.open(address, source)
    try:
        replies = [s.reply()]
        for line in lines:
            s.send(line)
            replies.append(s.reply())
        return replies
    finally:
        s.close()


# region: the cluster under attack


@contextmanager
def running_site(redis_server: RedisServer, data_dir: Path, org: Organization, *, mailboxes: list[str],
                 hub: str | None = "rx-1") -> Iterator[Cluster]:
    cluster = Cluster(redis_server.new_db(), data_dir, org, cwd=ROOT)
    try:
        if mailboxes:
            cluster.start_mailboxes(mailboxes)
        if hub:
            cluster.start_hub("Amsterdam", hub)
        yield cluster
    except BaseException:
        print(cluster.all_logs(60))
        raise
    finally:
        cluster.close()


def receive_pid(cluster: Cluster, hub: str = "rx-1") -> int:
    """The hub's receive process: the child of its worker main process running the listener's
    entry point, ``python -m mailyard.hub.receive_listener``."""
    def find() -> int | None:
        for pid in cluster.procs[hub].children():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if ENTRY_POINT.encode() in cmdline:  # (a child just forked still shows the hub's command line)
                return pid
        return None
    return wait_until(find, timeout=30, message=lambda: f"{hub} has no receive process: {cluster.tail(hub)}")


_LOG_HEADER = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (\w+) ([\w.]+): ")
RECEIVE_LOGGERS = ("mailyard.hub.receive", "mail.log", "asyncio")  # the receive process's loggers


def receive_errors(log: str) -> list[str]:
    """ERROR lines and tracebacks the receive process wrote to its hub's log."""
    found, logger = [], ""
    for line in log.splitlines():
        m = _LOG_HEADER.match(line)
        if m:
            logger = m.group(2)
            if m.group(1) in ("ERROR", "CRITICAL") and logger in RECEIVE_LOGGERS:
                found.append(line)
        elif line.startswith("Traceback") and logger in RECEIVE_LOGGERS:
            found.append(f"{logger}: {line}")
    return found


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state


# endregion
