"""The service folders live in the mailyard namespace and never shadow the standard library."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

from mailyard import keys

ROOT = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def test_service_folders_are_subpackages_of_mailyard() -> None:
    import mailyard.hub.app
    import mailyard.mailbox.store
    import mailyard.submission.service

    for module in (mailyard.hub.app, mailyard.mailbox.store, mailyard.submission.service):
        assert module.__name__.startswith("mailyard."), module.__name__


def test_python_m_from_the_repository_root_keeps_the_stdlib_mailbox() -> None:
    # `python -m` puts the working directory first on sys.path, as Celery does for its imports.
    code = "import mailbox, aiosmtpd.handlers; print(mailbox.__file__); print(mailbox.Maildir)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    path = Path(out.stdout.splitlines()[0]).resolve()
    assert path.parent == STDLIB, f"`import mailbox` from the repo root gave {path}"


def test_a_hub_worker_started_in_the_repository_root_uses_the_stdlib_mailbox(cluster_factory) -> None:
    # Given a hub started the way users start it, with the repository root as its directory
    cluster = cluster_factory(cwd=ROOT)
    hub = cluster.start_hub("Amsterdam", "ams-pkg-1")
    # Then the module its process imported as `mailbox` is the standard library's
    reported = cluster.r.hget(keys.hub(hub.name), "stdlib_mailbox")
    assert reported is not None, "the hub did not report which mailbox module it imported"
    assert Path(reported.decode()).resolve().parent == STDLIB, reported
