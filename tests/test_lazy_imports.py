"""Every `from rlx... import name` in the scripts and in rlx/ itself names something that exists.

Benchmarks and recipes import rlx lazily inside functions (to start fast and to keep a
subprocess' imports its own), so a renamed or moved function breaks them only when that path
runs, often in a slow test or an hour into a benchmark. This reads the imports without running
them and checks each name against the module it names.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("bench", "recipes", "rewards", "rlx")


def is_rlx(module: str | None) -> bool:
    return module is not None and (module == "rlx" or module.startswith("rlx."))


def rlx_imports() -> list[tuple[str, int, str, str]]:
    """(file, line, module, name) of every `from rlx[.x] import name` in FOLDERS."""
    found = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            rel = str(path.relative_to(ROOT))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and is_rlx(node.module):
                    found += [(rel, node.lineno, node.module, a.name) for a in node.names]
    return found


def test_the_scan_finds_the_lazy_imports_of_the_benchmarks():
    imports = rlx_imports()
    assert len(imports) > 100
    assert any(f.startswith("bench/") and m == "rlx.rewards" for f, _, m, _ in imports)


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_imported_rlx_name_exists(folder):
    missing = []
    for file, line, module, name in rlx_imports():
        if not file.startswith(folder + "/"):
            continue
        mod = importlib.import_module(module)
        if name != "*" and not hasattr(mod, name):
            try:  # a submodule not yet imported as an attribute
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{file}:{line}: from {module} import {name}")
    assert not missing, "names that do not exist:\n" + "\n".join(missing)
