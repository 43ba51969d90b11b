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


@register_method("centre")
class CentreMethod(Method):
    """A centre prior: relevance falls with the distance of the patch centre from the image
    centre. What a method must beat on data whose objects sit in the middle.
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
    """Every patch equally relevant: the harness's tie-break (patch index, row-major) alone
    sets the order, i.e. a raster scan from the top-left patch.
    """

    name = "constant"

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        return torch.zeros(images.shape[0], *self.adapter.grid, device=images.device)
