"""The tree shows the architecture: `api -> dispatch -> slots -> providers / supervisors / registry / hardware`,
and the shared base modules below them all. An import never points back up (a supervisor never imports a slot).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "hal0"
#: Higher imports lower, never the reverse; equal ranks are siblings (a supervisor takes a provider's Command).
RANK = {"api": 4, "dispatch": 3, "slots": 2, "providers": 1, "supervisors": 1, "registry": 1, "hardware": 1}
#: Modules every layer may use; they use no layer themselves.
BASE = ("errors", "settings", "events", "fsio", "redact", "kinds")


def _imports(path: Path) -> list[str]:
    """Every hal0 module `path` imports, at the top, inside functions or under TYPE_CHECKING alike."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hal0."):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("hal0.")]
    return found


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).parts
        layer = parts[0] if len(parts) > 1 else path.stem
        for module in _imports(path):
            target = module.split(".")[1]
            if layer in BASE and target in RANK:
                upward.append(f"{path.relative_to(SRC)} imports {module} (a base module uses no layer)")
            elif layer in RANK and target in RANK and RANK[target] > RANK[layer]:
                upward.append(f"{path.relative_to(SRC)} imports {module}")
    assert upward == []


def test_the_check_sees_imports_inside_functions_and_type_checking(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hal0.slots.slot import Slot\n"
                      "def f() -> None:\n    import hal0.api.app\n")
    assert _imports(module) == ["hal0.slots.slot", "hal0.api.app"]
