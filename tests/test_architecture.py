"""The packages depend on each other one way (docs/ARCHITECTURE.md, CONVENTIONS.md).

Every import counts, also those inside functions (a hidden import is a cycle all the same):
``common`` (ground floor) imports none of the rest, ``models`` only ``common``, ``worker``
``common`` and ``models``. The edges in ``service`` never import the worker: they hand it work
through ``common.queue`` and share what both need from ``common`` (geometry, TLS
associations) and ``models`` (package lookup). Within a package, modules import each other
without a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "models", "worker", "service")
ALLOWED = {
    "common": {"common"},
    "models": {"common", "models"},
    "worker": {"common", "models", "worker"},
    "service": {"common", "models", "service"},
}


def _module_name(path: Path) -> str:
    """The installed name: the folder ``models/`` is the package ``rtcontour.models``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["rtcontour", *parts])


def _floor(module: str) -> str:
    """``rtcontour.models.train`` -> ``models``."""
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere in its body (absolute names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {
        _module_name(path): path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {target for target in _imports(path) if target in modules} - {name}
    return graph


def test_packages_import_only_the_floors_below_them() -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if _floor(target) not in ALLOWED[_floor(module)]
    )
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_circle_of_imports_between_modules() -> None:
    graph = _graph()
    # Importing a package runs its __init__: an edge to "a.b" is also one to "a".
    state: dict[str, int] = {}
    path: list[str] = []
    cycles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "circular imports:\n" + "\n".join(cycles)


@pytest.mark.parametrize("package", ["rtcontour.common", "rtcontour.models"],
                         ids=["common", "models"])
def test_lower_floors_import_without_the_upper_ones(package: str) -> None:
    """Importing the ground floor or the models loads neither the worker nor the edges."""
    import subprocess
    import sys

    code = (
        f"import sys, pkgutil, importlib, {package}\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    if m.name.removeprefix('rtcontour.').startswith(('models.train', 'models.export',"
        " 'models.dose.train', 'models.gpu_burst', 'models.augment', 'models.ema',"
        " 'models.unet', 'models.run_files')):\n"
        "        continue  # torch-only modules (extra 'train')\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.startswith(('rtcontour.service',"
        " 'rtcontour.worker')))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
