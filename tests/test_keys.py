"""The key schema (mailyard.keys): every key it builds is documented in its docstring, and no
other module spells a key itself."""

from __future__ import annotations

import inspect
import re

import pytest

from mailyard import keys
from tests.conftest import ROOT

DOCUMENTED = keys.__doc__ or ""


def _built() -> list[tuple[str, str]]:
    """(name, the key with each argument left as a gap) for every constant and function of the schema."""
    out = []
    for name, value in vars(keys).items():
        if name.startswith("_") or name == "P":
            continue
        if isinstance(value, str) and value.startswith(keys.P):
            out.append((name, value))
        elif inspect.isfunction(value) and value.__module__ == keys.__name__:
            built = value(*["\0"] * len(inspect.signature(value).parameters))
            if built.startswith(keys.P):  # (outbox_ref is a reference, not a key)
                out.append((name, built))
    return out


@pytest.mark.parametrize(("name", "key"), _built(), ids=[n for n, _ in _built()])
def test_every_key_is_in_the_schema(name: str, key: str) -> None:
    fixed = key.split("\0", 1)[0]  # the part before the first argument
    documented = re.findall(r"^\s+(my:\S*)", DOCUMENTED, re.M) + re.findall(r"``(my:[^`]*)``", DOCUMENTED)
    assert any(d.startswith(fixed) for d in documented), f"keys.{name} ({fixed}...) is not in the schema"


def test_the_replication_fence_is_a_key_of_the_schema() -> None:
    from mailyard import durability

    assert durability.FENCE_CHANNEL == keys.DURABILITY_FENCE == "my:durability:fence"


def test_no_module_spells_a_key_itself() -> None:
    """Keys come from mailyard.keys (Lua scripts get them, or their prefixes, as arguments)."""
    literal = re.compile(r"""["']my:""")
    found = [f"{path.relative_to(ROOT)}:{n}"
             for folder in ("core", "hub", "mailbox", "submission")
             for path in sorted((ROOT / folder).rglob("*"))
             if path.suffix in (".py", ".lua") and path != ROOT / "core" / "keys.py"
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if literal.search(line)]
    assert found == []
