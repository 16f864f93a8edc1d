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


GLUE = ["megatron", "trainer.py", "parts.py", "sft.py", "rollout", "evaluate.py"]


def loss_name_uses(source: str, names) -> list[str]:
    """Where code asks a loss its name: a string constant that is a loss's name, or a comparison that reads a
    ``name`` / ``loss_name`` attribute. ``[line: what]``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            found.append(f"{node.lineno}: {node.value!r}")
        if isinstance(node, ast.Compare) and any(isinstance(n, ast.Attribute) and n.attr in ("name", "loss_name")
                                                 for n in ast.walk(node)):
            found.append(f"{node.lineno}: compares a name")
    return found


def test_the_glue_never_asks_a_loss_its_name():
    """The Megatron glue, the loops and the engines ask the loss object (``losses/base.py``) what they need: no
    string that is a loss's name appears in them, and no comparison reads a name (a log line may print it)."""
    from real_megatron.losses import LOSSES

    names = set(LOSSES) | {"sft"}
    found, files = [], 0
    for entry in GLUE:
        for path in ([PACKAGE / entry] if entry.endswith(".py") else sorted((PACKAGE / entry).glob("*.py"))):
            files += 1
            found += [f"{path.relative_to(PACKAGE)}:{where}" for where in loss_name_uses(path.read_text(), names)]
    assert not found, found
    assert files > 15
    # the check finds what it looks for
    assert loss_name_uses('def f(loss):\n    if loss.name == "grpo":\n        return 1\n', names) == [
        "2: compares a name", "2: 'grpo'"]
    assert loss_name_uses("x = LOSSES['real_bce']\n", names) == ["1: 'real_bce'"]
