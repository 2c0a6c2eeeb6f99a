"""The architecture's rules, checked: one-way imports (import-linter's contracts in pyproject.toml), no imports
inside functions, files under 600 lines and functions under 80 (STYLE.md: a room a reader can hold)."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "latentdiff"
SOURCES = sorted(PACKAGE.rglob("*.py"))
# Imports that stay inside functions, each for a reason: optional packages, imported where they are needed.
ALLOWED_LOCAL_IMPORTS = {
    "latentdiff/autoencoder/backbones.py": "the EfficientNet weights package: a missing one is a clear error "
                                           "with the command that installs it, raised only when they are needed",
}


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed")
def test_import_contracts_are_kept() -> None:
    done = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_imports_inside_functions() -> None:
    found = []
    for path in SOURCES:
        for fn in _functions(ast.parse(path.read_text())):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    where = str(path.relative_to(ROOT))
                    if where not in ALLOWED_LOCAL_IMPORTS:
                        found.append(f"{where}:{node.lineno}")
    assert not found, f"imports inside functions (move them to the module's top): {found}"


def test_files_and_functions_stay_small() -> None:
    big_files = [f"{p.relative_to(ROOT)} ({n} lines)" for p in SOURCES if (n := p.read_text().count("\n")) > 600]
    long_functions = [f"{p.relative_to(ROOT)}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
                      for p in SOURCES for fn in _functions(ast.parse(p.read_text()))
                      if fn.end_lineno - fn.lineno + 1 > 80]
    assert not big_files and not long_functions, f"split these: {big_files + long_functions}"
