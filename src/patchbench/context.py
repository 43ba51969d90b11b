"""What a component may ask of the run it is part of.

Methods and removal operators declare what they need from a run (a seed, the dataset's mean
colour, a trained artifact such as DiffMask's explainer) in one class method,
``options_from_run(run, options)``, whose default needs nothing. The runner calls it for every
component it creates and never tests a component's name.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from patchbench.datasets import DATASETS
from patchbench.datasets.stats import train_mean_colour


@dataclass
class RunContext:
    """One model on one dataset within a run.

    Attributes:
        cfg: The run's :class:`~patchbench.bench.config.BenchConfig`.
        dataset: The dataset's registered name.
        adapter: The model.
        meta: The model's record in ``run.json``; components add what they used.
        files: Extra files for the run folder (name -> source path), e.g. training logs.
        progress: Whether to show progress bars.
        once_per_node: Context in which work that fills a cache is done by one process per
            node while the others wait (torchrun); no-op in a single process.
        timing_only: The run only times the components (``patchbench speed``): a trained
            artifact whose cost does not depend on its training may be an untrained stand-in.
        sample_ids: Every evaluated sample's id, in sample order (all processes').
        ids: This process's share of ``sample_ids``.
        images: This process's model inputs ``[n, 3, H, W]``, in the order of ``ids``.
        operator: For a method trained for the removal it is scored under
            (``Method.trained_for_operator``): the operator whose table it is made for.
        operator_name: That operator's name in the run.
        train_seed: For a method that trains from a seed (``Method.trained``): this
            instance's seed (the run makes one per seed in ``cfg.train_seeds``).
    """

    cfg: Any
    dataset: str
    adapter: Any
    meta: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    progress: bool = True
    once_per_node: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    timing_only: bool = False
    sample_ids: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    images: Any = None
    operator: Any = None
    operator_name: str | None = None
    train_seed: int | None = None
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    def for_operator(self, name: str | None, operator: Any, train_seed: int | None = None) -> RunContext:
        """This context for a component made for operator ``name``'s table (None: for every
        table), trained with ``train_seed`` (the same meta, files and memo)."""
        return dataclasses.replace(self, operator=operator, operator_name=name, train_seed=train_seed)

    @property
    def seed(self) -> int:
        return self.cfg.seed

    def method_options(self, name: str) -> dict[str, Any]:
        """The user's options for method ``name`` (a copy)."""
        return dict(self.cfg.method_options.get(name, {}))

    def memo(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``'s result, computed once per run context (shared by the components)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def mean_colour(self) -> dict[str, Any]:
        """The dataset's mean colour, in pixels (``rgb``) and model input (``model_input``):
        the training split's mean, or the model's normalisation mean where the dataset has
        no training split. Recorded in ``meta["mean_colour"]``."""
        return self.memo("mean_colour", self._mean_colour)

    def _mean_colour(self) -> dict[str, Any]:
        colour = None if self.dataset not in DATASETS else train_mean_colour(  # data given as tensors
            self.dataset, self.seed, self.cfg.data_root, self.cfg.dataset_options.get(self.dataset))
        if colour is None:
            colour = {"rgb": list(self.adapter.mean), "source": "the model's normalisation mean "
                      f"({self.dataset} has no training split)"}
        pixels = torch.tensor(colour["rgb"], dtype=torch.float32).view(1, -1, 1, 1)
        model_input = self.adapter.normalize(pixels).flatten().tolist()
        self.meta["mean_colour"] = {**colour, "model_input": [round(v, 6) for v in model_input]}
        return self.meta["mean_colour"]


def options_from_run(factory: Any, run: RunContext, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` completed by the component's own ``options_from_run`` hook, if it has one
    (plugins registered as plain functions have none and get the options as given)."""
    hook = getattr(factory, "options_from_run", None)
    return hook(run, dict(options)) if hook is not None else dict(options)
