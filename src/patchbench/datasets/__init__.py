"""Datasets with ground-truth patch masks, generated from a seed (no download)."""

from typing import Any

from patchbench.datasets import files  # noqa: F401  (registration)
from patchbench.datasets.base import GroundTruthDataset
from patchbench.datasets.synthetic import DATASETS


def create_dataset(name: str, split: str = "test", **kwargs: Any) -> GroundTruthDataset:
    """Creates a registered dataset by name (``list_datasets()`` gives the names)."""
    return DATASETS.create(name, split=split, **kwargs)


def list_datasets(pattern: str = "*") -> list[str]:
    return DATASETS.list(pattern)


__all__ = ["DATASETS", "GroundTruthDataset", "create_dataset", "list_datasets"]
