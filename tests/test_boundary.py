"""The layout is the trust boundary; this test enforces it on the import graph.

* ``server/`` sees aggregates only: it may not import ``client`` or any module
  that handles raw text (Presidio, spaCy, the device store, the data generator).
* ``client/`` is the device: it may not import ``server``.
* ``common/`` is what both sides share: it may import neither side.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "server": {"client", "simulations", "presidio_analyzer", "presidio_anonymizer", "spacy", "faker", "sqlite3"},
    "client": {"server", "simulations"},
    "common": {"client", "server", "simulations", "presidio_analyzer", "presidio_anonymizer", "spacy", "sqlite3"},
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            roots.add(path.parent.name)  # relative import stays inside the package
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_trust_boundary(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules found in {package}/"
    violations = {
        str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package]) for f in files if imported_roots(f) & FORBIDDEN[package]
    }
    assert violations == {}


def test_checker_detects_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from client.store import DeviceStore\n")
    assert "client" in imported_roots(bad)
