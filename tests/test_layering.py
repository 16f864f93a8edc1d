"""The package's layers, as the README's package map states them: imports flow one way.

* ``real_megatron.repro`` (the paper at small scale) uses the stack; no stack module imports it (the
  ``real-megatron`` command table names its modules as strings, imported only when their command runs);
* ``real_megatron.losses`` is pure PyTorch: it imports no other part of the package and no Megatron.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "real_megatron"


def imports_of(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports are not used in this package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def stack_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "repro" not in p.relative_to(PACKAGE).parts]


def test_no_stack_module_imports_the_reproduction():
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in imports_of(p) if m.startswith("real_megatron.repro"))
                 for p in stack_files()}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"stack modules import real_megatron.repro: {offenders}"
    assert len(stack_files()) > 30  # the walk saw the package


def test_losses_are_pure_pytorch():
    for path in (PACKAGE / "losses").glob("*.py"):
        outside = sorted(m for m in imports_of(path) if (m.startswith("real_megatron.") and
                         not m.startswith("real_megatron.losses")) or m.startswith("megatron"))
        assert not outside, f"{path.name} imports {outside}"
