"""The import rule: subpackages by stage, imports only downward, no cycle.

Every ``import`` of the package (at module level or inside a function, ``TYPE_CHECKING`` blocks included) is
read from the source. A module may import modules of its own subpackage and of subpackages of a lower layer;
a cycle between modules, or an import of the same or a higher layer elsewhere, fails.
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

PACKAGE = "python_task"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Lowest first. The package's own top-level modules (errors, fileio, settings, runtime) are the base everything may
# use; cli, and __main__ which only calls it, sit on top. Subpackages of one layer do not import each other.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"errors", "fileio", "settings", "runtime", "__init__"}),
    frozenset({"wsi"}),
    frozenset({"shards", "synth"}),
    frozenset({"data"}),
    frozenset({"transforms"}),
    frozenset({"training"}),
    frozenset({"inference"}),
    frozenset({"experiments"}),
    frozenset({"cli"}),
    frozenset({"__main__"}),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (``from a.b import c`` counts ``a.b.c`` when it is a module)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != PACKAGE:
                continue
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def unit(name: str) -> str:
    """The subpackage (or top-level module) a module belongs to: ``python_task.wsi.slides`` -> ``wsi``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(name: str) -> int:
    for rank, units in enumerate(LAYERS):
        if unit(name) in units:
            return rank
    raise AssertionError(f"{name}: its subpackage {unit(name)!r} has no layer in LAYERS (add it)")


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


def upward_imports() -> list[str]:
    wrong = []
    for name, targets in graph().items():
        for target in sorted(targets):
            same_unit = unit(target) == unit(name) and len(name.split(".")) > 2
            if not (same_unit or layer(target) == 0 or layer(target) < layer(name)):
                wrong.append(f"{name} -> {target}")
    return wrong


def cycles() -> list[str]:
    g = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []
    found: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                found.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)
    return found


def test_imports_point_down():
    wrong = upward_imports()
    assert not wrong, "imports that do not point to a lower layer:\n" + "\n".join(wrong)


def test_no_import_cycle():
    found = cycles()
    assert not found, "import cycles:\n" + "\n".join(found)


def test_the_rule_catches_a_violation(tmp_path, monkeypatch):
    """Not vacuous: an upward import and a cycle planted in a copy of the package are both reported."""
    copy = tmp_path / PACKAGE
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "wsi" / "upward.py").write_text("from python_task.training import loop\n")
    (copy / "wsi" / "ping.py").write_text("from python_task.wsi import pong\n")
    (copy / "wsi" / "pong.py").write_text("def f():\n    import python_task.wsi.ping\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", copy)
    assert "python_task.wsi.upward -> python_task.training.loop" in upward_imports()
    assert any("python_task.wsi.ping" in c and "python_task.wsi.pong" in c for c in cycles())
