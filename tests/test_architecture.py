"""The shape of the package, checked on its source: what imports what, and how big modules grow.

These read ``sdtree/`` with :mod:`ast` (imports inside functions included),
so they hold for every module whether or not a test imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sdtree"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _package_of(module: str) -> str:
    """The package a module belongs to (a package belongs to itself)."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str) -> list[tuple[str, str, int]]:
    """``(imported module, imported name or "", line)`` for every sdtree import of ``module``."""
    found = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "sdtree":
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:  # from sdtree import errors: a module
                    found.append((f"{node.module}.{alias.name}", "", node.lineno))
                else:
                    found.append((node.module, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sdtree":
                    found.append((alias.name, "", node.lineno))
    return found


def test_no_private_name_or_module_is_imported_from_outside():
    """A name with a leading underscore stays in its module, and a module with
    one (``sdtree.checkpoint._lazy``) in its package: what another part of
    sdtree needs is public, in a module named for it (``errors.preview``,
    ``sdtree.types``)."""
    bad = []
    for module in MODULES:
        for target, name, line in _imports(module):
            if name.startswith("_") and not name.startswith("__"):
                bad.append(f"{module}:{line} imports {name} from {target}")
            parts = target.split(".")
            for depth, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:depth])  # the package the private module belongs to
                    if not (_package_of(module) + ".").startswith(owner + "."):
                        bad.append(f"{module}:{line} imports {target}, private to {owner}")
                    break
    assert not bad, "\n".join(bad)
