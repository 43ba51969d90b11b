"""Run configuration (kept free of heavy imports so the command line starts fast)."""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_METHODS = ("random", "centre", "constant", "attention", "rollout", "chefer", "gradcam",
                   "integrated_gradients", "smoothgrad", "occlusion", "rise", "diffmask")


@dataclass
class BenchConfig:
    """Everything that fixes a run (it is written to ``run.json``)."""

    run: str = "default"
    model: str = "pb-vit-tiny"
    pretrained: bool = False
    checkpoint: str | None = None
    data_root: str | None = None
    datasets: tuple[str, ...] = ("glyphs", "toy-count")
    methods: tuple[str, ...] = DEFAULT_METHODS
    operators: tuple[str, ...] = ("mean", "drop")
    n_images: int = 200
    steps: int | None = 16
    seed: int = 0
    target: str = "prediction"
    batch_size: int = 50
    gallery_size: int = 8  # images per dataset shown in report.html with every method's map
    sanity_images: int = 16  # images per dataset for the model-randomisation check (0: skip it)
    chunk_size: int | None = None  # most (image, step) rows per forward pass (None: 64 on CPU, 1024 on GPU)
    memory_budget: str | None = None  # e.g. "2GiB": rows per forward pass chosen to fit it
    results_dir: str = "results"
    plugins: tuple[str, ...] = ()  # method plugins: path/to/file.py or module:object
    overwrite: str = "missing"  # stored result chunks: never | missing | always
    device: str = "auto"  # auto = cuda when available, else cpu
    autocast: str | None = None  # bf16 or fp16 mixed precision on GPU
    train_data_root: str | None = None  # train split for DiffMask when it is another folder
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    operator_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    diffmask_config: dict[str, Any] = field(default_factory=dict)  # DiffMaskConfig overrides

    def validate(self) -> None:
        """Fails early, before any training or scoring, on an unknown name or bad value."""
        from patchbench.datasets import DATASETS
        from patchbench.methods import METHODS
        from patchbench.models import MODELS, OPERATORS

        if self.model not in MODELS and not self.model.startswith("hf:"):
            import timm

            if not timm.is_model(self.model):
                MODELS.get(self.model)  # raises, listing the embedded models
        for d in self.datasets:
            DATASETS.get(d)
        for m in self.methods:
            METHODS.get(m)
        for o in self.operators:
            OPERATORS.get(o)
        if self.target not in ("prediction", "label"):
            raise ValueError(f"target must be 'prediction' or 'label', got {self.target!r}")
        if self.n_images < 2:
            raise ValueError(f"n_images must be at least 2, got {self.n_images}")
        for name in ("gallery_size", "sanity_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.overwrite not in ("never", "missing", "always"):
            raise ValueError(f"overwrite must be never, missing or always, got {self.overwrite!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {self.chunk_size}")
        if self.memory_budget is not None:
            from patchbench.memory import parse_bytes

            parse_bytes(self.memory_budget)
        if self.autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"autocast must be bf16 or fp16 (or unset), got {self.autocast!r}")
        if self.device != "auto":
            import torch

            torch.device(self.device)  # raises on a malformed name
            if self.device.startswith("cuda") and not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} asked for, but CUDA is not available here")
        from patchbench.methods.diffmask_train import DiffMaskConfig

        known = {f.name for f in fields(DiffMaskConfig)}
        unknown = sorted(set(self.diffmask_config) - known)
        if unknown:
            raise ValueError(f"unknown diffmask_config keys {unknown}; valid: {', '.join(sorted(known))}")
        for kind, options, registry in (("method", self.method_options, METHODS),
                                        ("operator", self.operator_options, OPERATORS),
                                        ("dataset", self.dataset_options, DATASETS)):
            for name, opts in options.items():
                registry.get(name)
                if not isinstance(opts, dict):
                    raise ValueError(f"{kind}_options.{name} must be a table of options, got {opts!r}")


CONFIG_DIR = Path("configs")


def read_config(path_or_name: str | Path) -> dict[str, Any]:
    """Reads a TOML run config: a file path, or a name in ``configs/`` (``paper-cifar10``).

    Returns:
        The fields it sets (lists become tuples); unknown keys are refused, naming the
        closest valid one, so a typo never silently falls back to a default.
    """
    path = Path(path_or_name)
    if not path.is_file():
        named = CONFIG_DIR / f"{path_or_name}.toml"
        if not named.is_file():
            found = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
            raise FileNotFoundError(f"no config file {str(path_or_name)!r} and no {named}; "
                                    f"configs here: {', '.join(found) or 'none'}")
        path = named
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    names = {f.name for f in fields(BenchConfig)}
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{path}: unknown key {key!r}{hint}; valid keys: {', '.join(sorted(names))}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
