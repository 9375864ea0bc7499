"""DESIGN §3's dependency rules, as import-linter contracts (pyproject's [tool.importlinter])."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("import_contracts", ROOT / ".ci" / "import_contracts.py")
assert spec and spec.loader
contracts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(contracts)


def test_every_import_contract_is_kept(tmp_path: Path) -> None:
    contracts.lay_out(tmp_path)
    result = contracts.check(tmp_path, capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("hub/outcomes.py", "    from mailyard.hub import queue_actions\n", "never reach the operator"),
    ("mailbox/api.py", "    import mailyard.hub.node\n", "Mailbox servers know hubs only"),
    ("tracking.py", "    from mailyard.cli import main\n", "shared core imports none"),
    ("hub/records.py", "    from mailyard.hub import queues\n", "queue stack"),
])
def test_a_forbidden_import_breaks_its_contract_even_inside_a_function(tmp_path: Path, module: str, line: str,
                                                                       contract: str) -> None:
    contracts.lay_out(tmp_path)
    target = tmp_path / "mailyard" / module
    target.write_text(target.read_text() + "\n\ndef _late() -> None:\n" + line)
    result = contracts.check(tmp_path, capture_output=True)
    assert result.returncode != 0, result.stdout
    broken = [ln for ln in result.stdout.splitlines() if "BROKEN" in ln or contract in ln]
    assert any(contract in ln for ln in broken), result.stdout
