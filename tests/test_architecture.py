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


def _all_of(module: str) -> list[str] | None:
    for node in TREES[module].body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [ast.literal_eval(e) for e in node.value.elts]
    return None


# Left for the branch that owns the module (checkpoint/*).
NOT_YET_EXPORTED: set[tuple[str, str]] = set()
NOT_YET_PRIVATE = {"sdtree.checkpoint._inspect.dtype_name"}


def test_a_modules_interface_is_its_all():
    """Every module lists what it offers in ``__all__``; what another module
    imports from it is listed there, and every public-looking function or
    class is (or it is a private helper, with a leading underscore)."""
    bad = []
    used_exemptions = set()
    for module in MODULES:
        exports = _all_of(module)
        if exports is None:
            if module != "sdtree.__main__":
                bad.append(f"{module} has no __all__")
            continue
        for node in TREES[module].body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_") and node.name not in exports:
                name = f"{module}.{node.name}"
                if name in NOT_YET_PRIVATE:
                    used_exemptions.add(name)
                else:
                    bad.append(f"{name} is neither in __all__ nor private")
        for target, name, line in _imports(module):
            if not name or name.startswith("__") or target not in MODULES:
                continue
            target_exports = _all_of(target) or []
            if name not in target_exports:
                if (target, name) in NOT_YET_EXPORTED:
                    used_exemptions.add((target, name))
                else:
                    bad.append(f"{module}:{line} imports {name}, which {target}.__all__ does not list")
    assert not bad, "\n".join(bad)
    assert used_exemptions == NOT_YET_EXPORTED | NOT_YET_PRIVATE, "drop the exemptions no longer needed"


# -- the model is walked once per call -----------------------------------------


class _CountingChildren(dict):
    """A module's ``_modules`` that counts the walks enumerating its children
    (ours, or torch's ``named_modules`` / ``state_dict`` / ``named_parameters``)."""

    walks = 0

    def items(self):
        type(self).walks += 1
        return super().items()

    def values(self):
        type(self).walks += 1
        return super().values()

    def __iter__(self):
        type(self).walks += 1
        return super().__iter__()


def _counted(model):
    model._modules = _CountingChildren(model._modules)
    _CountingChildren.walks = 0
    return model


# A model whose modules customise saving (the checkpoint wrapper's state-dict
# hook) is read through its own state_dict(): torch's walk beside ours.
@pytest.mark.parametrize("setup,get_walks", [("plain", 1), ("tied", 1), ("frozen", 1), ("groups", 1), ("ac", 2)])
def test_get_and_set_state_dict_walk_the_model_once(setup, get_walks):
    import sdtree
    from sdtree import StateDictOptions
    from tests.adapters.models import train
    from tests.adapters.setups import build

    model, optim = build(setup)
    train(model, optim)
    for options in (StateDictOptions(), StateDictOptions(ignore_frozen_params=True), StateDictOptions(flatten_optimizer_state_dict=True)):
        _counted(model)
        msd, osd = sdtree.get_state_dict(model, optim, options=options)
        assert _CountingChildren.walks == get_walks, f"get_state_dict walked the model {_CountingChildren.walks} times"
        _CountingChildren.walks = 0
        sdtree.set_state_dict(model, optim, model_state_dict=msd, optim_state_dict=osd, options=options)
        assert _CountingChildren.walks == 1, f"set_state_dict walked the model {_CountingChildren.walks} times"
    broadcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    msd, osd = sdtree.get_state_dict(model, optim, options=broadcast)
    _CountingChildren.walks = 0
    sdtree.set_state_dict(model, optim, model_state_dict=msd, optim_state_dict=osd, options=broadcast)
    assert _CountingChildren.walks == 1, f"a broadcast set_state_dict walked the model {_CountingChildren.walks} times"


# -- no import circle, no module over 600 lines -----------------------------------


def _graph() -> dict[str, set[str]]:
    """Module -> the sdtree modules its import statements name (a package's
    re-exports included, the implicit import of a module's own parents not)."""
    return {module: {target for target, _, _ in _imports(module) if target != module} for module in MODULES}


def test_no_import_circle():
    graph = _graph()
    circles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


OVER_600_FOR_NOW: set[str] = set()  # none: a module over 600 lines is split by concept


def test_no_module_is_over_600_lines():
    sizes = {module: len(path.read_text().splitlines()) for module, path in MODULES.items()}
    over = {module for module, n in sizes.items() if n > 600}
    assert over - OVER_600_FOR_NOW == set(), {m: sizes[m] for m in over - OVER_600_FOR_NOW}
    assert OVER_600_FOR_NOW <= over, f"{OVER_600_FOR_NOW - over} are under 600 lines now: drop them from OVER_600_FOR_NOW"
