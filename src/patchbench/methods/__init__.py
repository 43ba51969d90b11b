"""Attribution methods, created by name from one registry.

Importing this package registers the built-in methods; the installed plugins are loaded the
first time a method is created or listed by name.
"""

import warnings
from typing import Any

from patchbench.methods import (  # noqa: F401  (registration)
    attention,
    controls,
    diffmask,
    gradients,
    lrp,
    perturbation,
    plugins,
    precomputed,
)
from patchbench.methods.base import (
    METHODS,
    Method,
    MethodOutputError,
    register_method,
)
from patchbench.models.adapter import ImageAdapter

__all__ = ["METHODS", "Method", "MethodOutputError", "create_method", "list_methods",
           "register_method"]


def create_method(name: str, adapter: ImageAdapter, **options: Any) -> Method:
    """Creates a registered method by name; ``options`` go to its constructor."""
    _load_installed_plugins()
    return METHODS.create(name, adapter, **options)


def list_methods(pattern: str | list[str] = "*") -> list[str]:
    """Registered method names matching wildcard pattern(s), e.g. ``list_methods("*grad*")``."""
    _load_installed_plugins()
    return METHODS.list(pattern)


def _load_installed_plugins() -> None:
    for problem in plugins.load_entry_points():
        warnings.warn(problem, stacklevel=3)
