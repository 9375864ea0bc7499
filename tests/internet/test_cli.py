"""``mailyard internet serve`` and ``show`` as a user runs them, in a real process."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailyard.internet.dns import make_resolver
from mailyard.internet.sink import Sink
from mailyard.testing.waiting import wait_until


def mailyard(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailyard", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=30)


class Served:
    def __init__(self, proc: subprocess.Popen, out: Path) -> None:
        self.proc, self.out = proc, out

    def output(self) -> str:
        return self.out.read_text()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Served]:
    out = tmp_path / "serve.out"
    with out.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailyard", "internet", "serve", "--dir", str(tmp_path / "mail"),
             "--dns", "127.0.0.1:0", "--smtp-port", "0"],
            stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path,
        )
    served = Served(proc, out)
    try:
        wait_until(lambda: "Serving" in served.output() or proc.poll() is not None, timeout=15)
        assert proc.poll() is None, served.output()
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_receive_stop_and_show(serve, tmp_path) -> None:
    output = serve.output()
    dns_port = int(re.search(r"DNS\s+127\.0\.0\.1:(\d+)", output).group(1))
    smtp_port = int(re.search(r"^fabrikam\.example\s.*\s127\.0\.0\.2:(\d+)$", output, re.M).group(1))
    assert re.search(rf"^wingtiptoys\.example\s+10 mx\.wingtiptoys\.example\s+127\.0\.0\.4\s+127\.0\.0\.4:{smtp_port}$",
                     output, re.M), output

    # Given the way a send connector finds the domain's mail server: MX, then its address
    resolver = make_resolver("127.0.0.1", dns_port)
    (mx,) = resolver.resolve("fabrikam.example", "MX")
    assert mx.exchange.to_text() == "mx.fabrikam.example."
    (address,) = resolver.resolve(mx.exchange, "A")
    assert address.address == "127.0.0.2"

    # When a message is sent there
    with smtplib.SMTP(address.address, smtp_port, timeout=5) as client:
        client.sendmail("alice@contoso.com", ["grace@fabrikam.example"],
                        b"From: alice@contoso.com\r\nTo: grace@fabrikam.example\r\nSubject: Hello Grace\r\n"
                        b"Message-ID: <demo-1@contoso.com>\r\n\r\nHi\r\n")

    # And the demo Internet is stopped with SIGTERM, it exits cleanly
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.proc.wait(timeout=10) == 0, serve.output()
    assert "Stopped." in serve.output()

    # Then `show` lists the message
    result = mailyard("internet", "show", "fabrikam.example", "--dir", str(tmp_path / "mail"), "--json",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (item,) = json.loads(result.stdout)
    assert item["from"] == "alice@contoso.com" and item["to"] == ["grace@fabrikam.example"]
    assert item["subject"] == "Hello Grace" and item["message_id"] == "<demo-1@contoso.com>"
    assert item["envelope_to"] == ["grace@fabrikam.example"]

    table = mailyard("internet", "show", "fabrikam.example", "--dir", str(tmp_path / "mail"), cwd=tmp_path)
    assert "Hello Grace" in table.stdout and "<demo-1@contoso.com>" in table.stdout


@pytest.mark.parametrize("message_id", [b"<[@x>", b"<x@[", b"<x@[127.0.0.1", b"<:>", b"<@>", b"<",
                                        b"<" + b"\r\n ".join([b"(" * 500] * 6) + b">"])
def test_show_lists_a_message_whose_headers_cannot_be_parsed(tmp_path, message_id: bytes) -> None:
    """Anyone on the Internet can send anything: a Message-ID (or From) the email package trips
    over, or a subject of 8-bit bytes, is shown as it came."""
    raw = (b"From: <grace@[fabrikam\r\nTo: henry@fabrikam.example\r\nSubject: caf\xe9 \xff\r\n"
           b"Message-ID: " + message_id + b"\r\n\r\nhi\r\n")
    with Sink(tmp_path / "mail") as sink, smtplib.SMTP(*sink.address, timeout=5) as client:
        client.sendmail("grace@fabrikam.example", ["henry@fabrikam.example"], raw)
    shown = mailyard("internet", "show", "fabrikam.example", "--dir", str(tmp_path / "mail"), "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    (item,) = json.loads(shown.stdout)
    assert item["message_id"] == message_id.decode().replace("\r\n", "")  # (unfolded)
    assert item["subject"] == "caf\ufffd \ufffd"
    assert item["envelope_from"] == "grace@fabrikam.example"
    table = mailyard("internet", "show", "fabrikam.example", "--dir", str(tmp_path / "mail"), cwd=tmp_path)
    assert table.returncode == 0 and message_id.decode()[:20] in table.stdout, table.stderr


def test_show_defaults_to_the_data_dir_and_says_when_there_is_nothing(tmp_path) -> None:
    env = {"MAILYARD_DATA_DIR": str(tmp_path / "data")}
    result = mailyard("internet", "show", "tailspintoys.example", cwd=tmp_path, env=env)
    assert result.returncode == 0
    assert f"No messages for tailspintoys.example in {tmp_path / 'data' / 'internet'}" in result.stdout
    result = mailyard("internet", "show", "tailspintoys.example", "--json", cwd=tmp_path, env=env)
    assert json.loads(result.stdout) == []


def test_serve_says_when_it_cannot_listen(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.3", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = mailyard("internet", "serve", "--dir", str(tmp_path), "--dns", "127.0.0.1:0",
                          "--smtp-port", str(port), "--domain", "a.example", "--domain", "b.example",
                          cwd=tmp_path)
    assert result.returncode == 1
    assert "error: cannot listen" in result.stderr and "127.0.0.3" in result.stderr


def test_serve_refuses_an_address_off_loopback(tmp_path) -> None:
    result = mailyard("internet", "serve", "--first-ip", "192.0.2.1", cwd=tmp_path)
    assert result.returncode == 2 and "not a loopback address" in result.stderr
