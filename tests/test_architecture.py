"""The structure the project promises (docs/architecture.md), checked on the source: no module reaches for
another's private names, package modules import each other at the top (not inside functions, which hides
cycles), and version branches stay in the version modules. The import layers are checked by `lint-imports`
(pyproject.toml), run here too when import-linter is installed."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rwkv_convert"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _ours(node: ast.ImportFrom) -> bool:
    return node.level > 0 or (node.module or "").split(".")[0] == "rwkv_convert"


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and _ours(node):
                found += [f"{path.relative_to(PACKAGE)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found


def test_package_modules_are_imported_at_the_top():
    """Optional third-party packages (onnx, gguf, llama_cpp, ...) may be imported where they are used, so that
    a missing one is a clear error only for the feature that needs it; our own modules may not."""
    found = []
    for path in SOURCES:
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and _ours(node) or isinstance(node, ast.Import) and any(
                        a.name.split(".")[0] == "rwkv_convert" for a in node.names):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, found


def test_version_branches_live_in_the_version_modules():
    """`version ==` / `major ==` outside arch/ only where a comment on the line says why it belongs there."""
    pattern = re.compile(r"\b(version|major) ==")
    found = []
    for path in SOURCES:
        if path.parent.name == "arch" or path.name == "fixtures.py":  # fixtures build each version's tensors
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and "#" not in line:
                found.append(f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert not found, found


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter not installed")
def test_import_layers_hold():
    proc = subprocess.run(["lint-imports"], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_modules_stay_small_and_the_cli_thin():
    """A big room splits along its layers (docs/architecture.md): no module over 450 lines, cli.py under 300."""
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 450} == {}
    assert sizes["cli.py"] < 300


def test_no_fault_switch_ships():
    """Faults are caused by the tests (monkeypatched, or made in their own files), never by a switch in shipped
    code that a user's environment could turn on."""
    shipped = [p for p in PACKAGE.rglob("*") if p.suffix in (".py", ".c", ".cpp", ".cu", ".cuh", ".h")]
    assert not [p.name for p in shipped if re.search(r"CORRUPT|FAULT_INJECT|RWKV_CONVERT_BREAK", p.read_text())]
