"""Control methods: what a real method must beat."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from patchbench.methods.base import Method, register_method
from patchbench.models.adapter import ImageAdapter
from patchbench.models.removal import hash_seed


@register_method("random")
class RandomMethod(Method):
    """Uniform random maps, seeded per image: the same image gets the same map in any batch.

    The seed mixes ``seed`` with a hash of the image's content.

    Args:
        seed: Seed mixed with each image's content hash.
    """

    name = "random"
    chance_control = True

    @classmethod
    def options_from_run(cls, run: Any, options: dict[str, Any]) -> dict[str, Any]:
        return {"seed": run.seed, **options}  # the run's seed unless one is given

    def __init__(self, adapter: ImageAdapter, seed: int = 0) -> None:
        super().__init__(adapter)
        self.seed = seed

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        maps = []
        for image in images:
            digest = hashlib.sha256(image.detach().float().cpu().numpy().tobytes()).digest()
            g = torch.Generator().manual_seed(hash_seed(self.seed, int.from_bytes(digest[:7], "little")))
            maps.append(torch.rand(self.adapter.grid, generator=g))
        return torch.stack(maps).to(images.device)


@register_method("centre")
class CentreMethod(Method):
    """A centre prior: patches nearer the image centre rank higher.

    Relevance is minus the distance of the patch centre from the image centre: what a method
    must beat on data whose objects sit in the middle.
    """

    name = "centre"

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        hp, wp = self.adapter.grid
        y = torch.arange(hp, dtype=torch.float32) - (hp - 1) / 2
        x = torch.arange(wp, dtype=torch.float32) - (wp - 1) / 2
        # scaled by the grid, so a non-square grid's prior is elliptical like the image
        distance = ((y / hp).view(-1, 1) ** 2 + (x / wp).view(1, -1) ** 2).sqrt()
        return (-distance).expand(images.shape[0], hp, wp).to(images.device).clone()


@register_method("constant")
class ConstantMethod(Method):
    """Every patch equally relevant: the order is the tie-break, a raster scan.

    The harness breaks ties by patch index (row-major), so patches go from the top-left one.
    """

    name = "constant"

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        return torch.ones(images.shape[0], *self.adapter.grid, device=images.device)
