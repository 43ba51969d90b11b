"""The built-in components by name, read from patchbench's source without importing it.

``patchbench list`` answers from here in a fraction of a second: registering the built-ins
means importing them, and they import torch (about 2 s). The names and one-line
descriptions are taken from the registration decorators (``@register_method("rollout")``,
``@OPERATORS.register("mean")``, ...) and the decorated class's or function's docstring, so
adding a component stays one file; ``tests/test_packaging.py`` checks that this catalogue
equals the live registries. Plugins are imported as usual: they may register anything.
"""

from __future__ import annotations

import ast
import functools
from importlib.metadata import entry_points
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
KINDS = {  # kind -> the decorators that register into its registry
    "methods": ("METHODS.register", "register_method"),
    "datasets": ("DATASETS.register",),
    "operators": ("OPERATORS.register",),
    "models": ("MODELS.register",),
}
PLUGIN_GROUPS = ("patchbench.methods", "patchbench.operators", "patchbench.datasets", "patchbench.scores")


def _decorator_name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return f"{node.value.id}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


@functools.cache
def builtins() -> dict[str, dict[str, str]]:
    """Kind -> {name: first line of its docstring} of every built-in component."""
    out: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef | ast.FunctionDef):
                continue
            for d in node.decorator_list:
                if not (isinstance(d, ast.Call) and d.args and isinstance(d.args[0], ast.Constant)):
                    continue
                kind = next((k for k, names in KINDS.items() if _decorator_name(d.func) in names), None)
                if kind:
                    doc = (ast.get_docstring(node) or "").strip().splitlines()
                    out[kind][d.args[0].value] = doc[0] if doc else ""
    return out


def has_installed_plugins() -> bool:
    """Whether any installed package declares a patchbench entry point."""
    return any(entry_points(group=group) for group in PLUGIN_GROUPS)
