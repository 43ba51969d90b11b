"""Control methods: what a real method must beat."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from patchbench.methods.base import Method, register_method
from patchbench.models.adapter import ImageAdapter
from patchbench.models.removal import hash_seed


@register_method("random")
class RandomMethod(Method):
    """Uniform random maps, seeded by (seed, image content): the same image gets the same map
    in any batch.

    Args:
        seed: Seed mixed with each image's content hash.
    """

    name = "random"

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
