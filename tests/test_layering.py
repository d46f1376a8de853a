"""The import direction of the packages (docs/architecture.md): node -> reporting -> processing.

``processing`` (the science) imports neither ``node`` nor ``reporting``; ``reporting`` (the DICOM
encoders) does not import ``node``. Every import statement is checked, including those inside
functions and ``TYPE_CHECKING`` blocks: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: package -> top-level packages of this repository it must never import
FORBIDDEN = {"processing": {"node", "reporting"}, "reporting": {"node"}}


def forbidden_imports(source: str, package: str) -> list[tuple[int, str]]:
    """(line, imported module) of every import in `source` that `package` must not make."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.extend(
            (node.lineno, name) for name in names if name.split(".")[0] in FORBIDDEN[package]
        )
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_layering(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    violations = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in files
        for line, name in forbidden_imports(path.read_text(encoding="utf-8"), package)
    ]
    assert not violations, "\n".join(violations)


def test_the_check_finds_a_forbidden_import():
    source = (
        "import numpy\nfrom processing.series import Geometry\n"
        "def f():\n    from node.chain import run_chain\n    import reporting.seg as s\n"
    )
    assert forbidden_imports(source, "processing") == [(4, "node.chain"), (5, "reporting.seg")]
    assert forbidden_imports(source, "reporting") == [(4, "node.chain")]
