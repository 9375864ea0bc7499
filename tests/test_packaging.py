"""The service folders live in the mailyard namespace and never shadow the standard library."""

from __future__ import annotations

import ast
import subprocess
import sys
import sysconfig
from pathlib import Path

from mailyard import keys

ROOT = Path(__file__).resolve().parent.parent
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()

# The composition root: the CLI (with `python -m mailyard`) and the local site runner.
COMPOSITION_ROOT = ("core/cli/", "core/site/", "core/__main__.py")
# mailyard.testing starts clusters of real processes as the site runner does, and takes its
# Redis starter and free_port from mailyard.site: an exception until those move to the core library.
NOT_YET = ("core/testing/",)


def test_service_folders_are_subpackages_of_mailyard() -> None:
    import mailyard.edge.run
    import mailyard.hub.app
    import mailyard.mailbox.store
    import mailyard.submission.service

    for module in (mailyard.hub.app, mailyard.mailbox.store, mailyard.submission.service, mailyard.edge.run):
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


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found


def test_nothing_but_the_composition_root_imports_the_cli_or_the_site_runner() -> None:
    offenders = []
    for folder in ("hub", "mailbox", "submission", "edge", "core"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith(COMPOSITION_ROOT + NOT_YET):
                continue
            offenders += [f"{relative} imports {name}" for name in sorted(imported_modules(path))
                          if name.split(".")[:2] in (["mailyard", "cli"], ["mailyard", "site"])]
    assert not offenders, "\n".join(offenders)
