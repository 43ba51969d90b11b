"""Plugins: installed packages (entry points) and files or modules named on the command line.

A plugin module registers what it adds when imported (``@register_method``,
``@OPERATORS.register``, ``@DATASETS.register``, ``@register_score``). An entry point may
also name one class, registered under the entry point's name: a :class:`Method` subclass in
the ``patchbench.methods`` group, a removal operator in ``patchbench.operators``, a dataset
in ``patchbench.datasets``. A plugin that fails to import, registers a name already taken, or
does not follow the contract is reported by name with what is wrong; the other plugins and
the run go on.

Entry points, in a plugin package's ``pyproject.toml``::

    [project.entry-points."patchbench.methods"]
    vargrad = "patchbench_vargrad:VarGrad"

    [project.entry-points."patchbench.scores"]
    my_scores = "my_package.scores"    # a module that calls register_score
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from patchbench.catalogue import PLUGIN_GROUPS
from patchbench.datasets import DATASETS
from patchbench.datasets.base import GroundTruthDataset
from patchbench.datasets.files import FileDataset
from patchbench.log import get_logger
from patchbench.methods.base import METHODS, Method
from patchbench.metrics.scores import SCORES
from patchbench.models import MODELS, OPERATORS
from patchbench.models.removal import RemovalOperator

LOG = get_logger(__name__)
GROUP = "patchbench.methods"
GROUPS = PLUGIN_GROUPS
PROBLEMS: list[str] = []  # every problem met so far in this process
_entry_point_problems: list[str] = []
_entry_points_loaded = False
_specs_loaded: dict[str, list[str]] = {}  # spec -> the problems it had


def load_entry_points(force: bool = False) -> list[str]:
    """Loads every installed plugin of every group in :data:`GROUPS` once; returns the
    problems met."""
    global _entry_points_loaded
    if _entry_points_loaded and not force:
        return []
    _entry_points_loaded = True
    problems = []
    for group in GROUPS:
        for ep in entry_points(group=group):
            dist = getattr(getattr(ep, "dist", None), "name", None)
            label = (f"[{group}] " if group != GROUP else "") + f"{ep.name} = {ep.value}"
            label += f" (package {dist})" if dist else ""
            problems += _add(label, ep.load, ep.name, group)
    _entry_point_problems.extend(problems)
    PROBLEMS.extend(problems)
    return problems


def load_all(specs: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Installed plugins and the given specs; problems met for the first time are printed as
    warnings on stderr (and returned)."""
    problems = load_entry_points()
    for spec in specs:
        problems += load_plugin(spec)
    for p in problems:
        LOG.warning(f"patchbench: warning: {p}")
    return problems


def problems_of(specs: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The problems of the installed plugins and of the given ``--plugin`` specs."""
    return [*_entry_point_problems, *(p for s in specs for p in _specs_loaded.get(s, []))]


def load_plugin(spec: str) -> list[str]:
    """Loads ``path/to/file.py``, ``module`` or ``module:object`` (once; later calls with the
    same spec do nothing); returns the problems met."""
    if spec in _specs_loaded:
        return []
    if spec.endswith(".py"):
        problems = _add(spec, lambda: _import_file(Path(spec)))
    else:
        module, _, attr = spec.partition(":")
        problems = _add(spec, lambda: _import_object(module, attr))
    _specs_loaded[spec] = problems  # reported once, not again by every later caller
    PROBLEMS.extend(problems)
    return problems


def contract_problem(cls: type) -> str | None:
    """Why a class cannot be a method, or None when it can be registered."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        return (f"{cls!r} is not a patchbench Method subclass (expected a class deriving from "
                "patchbench.methods.Method that overrides _attribute, or a module that registers one)")
    if cls._attribute is Method._attribute:
        return f"{cls.__name__} does not override _attribute(images, target) -> maps [B, Hp, Wp]"
    return None


def _registries() -> list[Any]:
    """Every registry a plugin module may add to (methods, datasets, operators, models, scores)."""
    return [METHODS, DATASETS, OPERATORS, MODELS, SCORES]


def _registered() -> set[tuple[int, str]]:
    return {(i, name) for i, r in enumerate(_registries()) for name in r.list()}


def _add(label: str, load: Callable[[], Any], name: str | None = None, group: str = GROUP) -> list[str]:
    before = _registered()
    try:
        obj = load()
    except Exception as e:  # a broken plugin must not stop the others
        registries = _registries()
        for i, added in _registered() - before:  # nothing half-loaded stays registered
            registries[i].unregister(added)
        return [f"plugin {label} failed to load: {type(e).__name__}: {e}"]
    if isinstance(obj, ModuleType):
        if _registered() - before:
            return []  # it registered its components (methods, datasets, ...) itself
        if group != GROUP:
            return [f"plugin {label}: the module registers no method, dataset, operator, model or score"]
        # otherwise: the Method subclasses it defines, each under its ``name``
        defined = [c for c in vars(obj).values() if isinstance(c, type) and issubclass(c, Method)
                   and c.__module__ == obj.__name__ and c._attribute is not Method._attribute]
        if not defined:
            return [f"plugin {label} defines no Method subclass overriding _attribute and registers "
                    "no method, dataset, operator, model or score"]
        return [p for c in defined for p in _add(f"{label}:{c.__name__}", lambda c=c: c)]
    if group != GROUP:
        return _add_component(label, obj, name, group)
    problem = contract_problem(obj)
    if problem:
        return [f"plugin {label}: {problem}"]
    key = name or (obj.name if obj.name != "base" else obj.__name__.lower())
    try:
        METHODS.register(key)(obj)
    except ValueError as e:  # the name is taken: say by whom
        return [f"plugin {label}: {e}"]
    if obj.name == "base":
        obj.name = key
    return []


def _add_component(label: str, obj: Any, name: str, group: str) -> list[str]:
    """An entry point naming one operator or dataset class, registered under its name."""
    kinds = {"patchbench.operators": (OPERATORS, (RemovalOperator,), "a RemovalOperator subclass"),
             "patchbench.datasets": (DATASETS, (GroundTruthDataset, FileDataset),
                                     "a GroundTruthDataset or FileDataset subclass")}
    if group not in kinds:
        return [f"plugin {label}: a {group} entry point must name a module that registers "
                f"its components, got {obj!r}"]
    registry, bases, expected = kinds[group]
    if not (isinstance(obj, type) and issubclass(obj, bases)):
        return [f"plugin {label}: expected {expected} or a module that registers one, got {obj!r}"]
    try:
        registry.register(name)(obj)
    except ValueError as e:  # the name is taken: say by whom
        return [f"plugin {label}: {e}"]
    return []


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise FileNotFoundError(f"no such file {path}")
    # the path's hash keeps two plugin files with the same name apart
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"patchbench_plugin_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_object(module: str, attr: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj
