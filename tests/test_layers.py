"""The architecture's layers (DESIGN.md §5) beyond what `lint-imports` checks in fkpd.

`lint-imports` (run by `make test`) holds the contracts inside the fkpd package
(pyproject.toml [tool.importlinter]); app/ is a folder of Streamlit scripts, not a
package, so its rule is checked here: pages talk to the studio layer (and the store's
value types), never to training, preferences, policies, data or environments.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = ("fkpd.studio", "fkpd.store")


def _fkpd_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fkpd":
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.split(".")[0] == "fkpd"]
    return names


def test_app_pages_import_only_the_studio_layer():
    scripts = sorted((ROOT / "app").rglob("*.py"))
    assert len(scripts) >= 6, scripts
    bad = {str(p.relative_to(ROOT)): m for p in scripts for m in _fkpd_imports(p)
           if m != "fkpd" and not m.startswith(ALLOWED)}
    assert bad == {}, f"app/ must import fkpd.studio (or store types) only: {bad}"
    assert any(_fkpd_imports(p) for p in scripts), "the pages import the studio layer"


def test_import_checker_sees_a_forbidden_import(tmp_path):
    page = tmp_path / "page.py"
    page.write_text("import streamlit as st\nfrom fkpd.train.align import AlignConfig\nimport fkpd.envs\n")
    assert _fkpd_imports(page) == ["fkpd.train.align", "fkpd.envs"]
