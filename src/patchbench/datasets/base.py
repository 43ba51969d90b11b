"""Dataset contract: every sample is (image in [0, 1] ``[3, H, W]``, label, ground-truth pixel mask)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

SPLITS = {"train": 0, "test": 1}


class GroundTruthDataset(Dataset):
    """A synthetic dataset generated deterministically from a seed, sample by sample.

    Sample ``i`` of a split depends only on ``(seed, split, i)``, so a subset or a longer
    dataset gives the same images for the same indices.

    Args:
        split: ``"train"`` or ``"test"``.
        size: Number of samples.
        seed: Generation seed.
    """

    name = "base"
    num_classes = 0
    image_size: tuple[int, int] = (0, 0)
    has_ground_truth = True
    default_size = {"train": 20_000, "test": 2_000}

    def __init__(self, split: str = "test", size: int | None = None, seed: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        self.split = split
        self.size = self.default_size[split] if size is None else size
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, int, Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        image, label, mask = self.generate(rng)
        return torch.from_numpy(image).permute(2, 0, 1).float(), int(label), torch.from_numpy(mask)

    def generate(self, rng: np.random.Generator) -> tuple[np.ndarray, int, np.ndarray]:
        """One sample: image ``[H, W, 3]`` float32 in [0, 1], label, mask ``[H, W]`` bool."""
        raise NotImplementedError

    has_train_split = True

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "split": self.split, "size": self.size, "seed": self.seed}

    def mean_colour(self) -> tuple[float, float, float]:
        """Mean RGB in [0, 1] over every pixel of every sample of this split."""
        total, count = torch.zeros(3, dtype=torch.float64), 0
        for i in range(self.size):
            image = self[i][0].double()
            total += image.sum((1, 2))
            count += image[0].numel()
        return tuple(float(v) for v in total / count)

    def tensors(self, indices: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Stacked images ``[N, 3, H, W]``, labels ``[N]`` and masks ``[N, H, W]``."""
        samples = [self[i] for i in (range(self.size) if indices is None else indices)]
        images, labels, masks = zip(*samples)
        return torch.stack(images), torch.tensor(labels), torch.stack(masks)


def select_samples(labels: Tensor, n: int, seed: int) -> list[int]:
    """``n`` sample indices stratified over classes: a seeded shuffle, then round-robin
    over classes, so a small ``n`` still covers every class (not the first n in order)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    by_class = [order[labels[order] == c].tolist() for c in labels.unique().tolist()]
    picked = [i for group in zip(*by_class) for i in group]  # round-robin
    rest = [i for group in by_class for i in group[len(picked) // len(by_class):]]
    return sorted((picked + rest)[:n])
