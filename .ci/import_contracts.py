"""Check the package as it is installed: DESIGN §3's import contracts (pyproject's
[tool.importlinter]) with import-linter, and with ``--types`` its types with mypy.

The three service folders are mapped into the ``mailyard`` namespace by pyproject's
package-dir (they have no __init__.py on purpose, see core/__init__.py), which an editable
install resolves with an import hook that import-linter cannot follow. So the packages are
laid out as they are installed, in a temporary folder, and checked there. Exit code as
``lint-imports``'s (0: every contract kept) or mypy's. mypy needs the same lay-out: through
the editable install's hook every ``mailyard.*`` import would be unresolved, so nothing
would be checked across modules.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lay_out(target: Path) -> None:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    # the root package first, then the folders mapped inside it
    for package, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
        dest = target.joinpath(*package.split("."))
        shutil.copytree(ROOT / folder, dest, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "static", "*.lua"))
        # (here, inside mailyard/, an __init__.py shadows nothing; import-linter needs one)
        dest.joinpath("__init__.py").touch()


def check(tree: Path, **run: object) -> subprocess.CompletedProcess[str]:
    """Run lint-imports over the packages laid out in ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    return subprocess.run([lint, "--no-cache", str(ROOT / "pyproject.toml")], cwd=tree, env=env, text=True,
                          **run)  # type: ignore[call-overload]


def check_types(tree: Path) -> int:
    env = {**os.environ, "MYPYPATH": str(tree)}
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--cache-dir", str(tree / ".mypy_cache"), "-p", "mailyard"], cwd=tree, env=env
                          ).returncode


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mailyard-imports-") as tmp:
        lay_out(Path(tmp))
        if "--types" in sys.argv[1:]:
            return check_types(Path(tmp))
        return check(Path(tmp)).returncode


if __name__ == "__main__":
    sys.exit(main())
