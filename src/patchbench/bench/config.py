"""Run configuration (kept free of heavy imports so the command line starts fast)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_METHODS = ("random", "attention", "rollout", "gradcam", "integrated_gradients", "diffmask")


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
    chunk_size: int = 512
    results_dir: str = "results"
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    diffmask_config: dict[str, Any] = field(default_factory=dict)  # DiffMaskConfig overrides

    def validate(self) -> None:
        """Fails early, before any training or scoring, on an unknown name or bad value."""
        from patchbench.datasets import DATASETS
        from patchbench.methods import METHODS
        from patchbench.models import MODELS, OPERATORS

        if self.model not in MODELS:
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
