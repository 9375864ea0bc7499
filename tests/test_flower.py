"""Flower's logon as ``mailyard flower`` runs it (mailyard.flower), over real HTTP: basic auth
covers its pages, REST API and /metrics, and takes the scheme in any case (RFC 7235)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from mailyard.site.redis_server import free_port
from mailyard.testing.waiting import wait_until
from tests.conftest import ROOT

USER, PASSWORD = "admin", "flower-test-password"


@pytest.fixture(scope="module")
def flower(redis_server) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAILYARD_", "FLOWER_"))}
    env.update(MAILYARD_REDIS_URL=redis_server.new_db(), FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}")
    proc = subprocess.Popen([sys.executable, "-m", "mailyard", "flower", "--address", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        try:
            return httpx.get(f"{base}/healthcheck", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(up, timeout=60, interval=0.2, message="Flower did not come up")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def credentials(scheme: str, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": f"{scheme} " + base64.b64encode(f"{USER}:{password}".encode()).decode()}


@pytest.mark.parametrize("path", ["/workers", "/api/workers", "/metrics"])
@pytest.mark.parametrize("scheme", ["Basic", "basic", "BASIC", "bAsIc"])
def test_the_basic_scheme_is_taken_in_any_case(flower: str, path: str, scheme: str) -> None:
    assert httpx.get(flower + path, headers=credentials(scheme), timeout=10).status_code == 200
    assert httpx.get(flower + path, headers=credentials(scheme, "wrong"), timeout=10).status_code == 401


@pytest.mark.parametrize("path", ["/workers", "/api/workers", "/metrics"])
@pytest.mark.parametrize("authorization", [None, "Basic", "Basic !!!", "Bearer " + PASSWORD, "Basics " + PASSWORD,
                                           credentials("Digest")["Authorization"]])
def test_without_the_logon_it_is_401(flower: str, path: str, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    assert httpx.get(flower + path, headers=headers, timeout=10).status_code == 401
