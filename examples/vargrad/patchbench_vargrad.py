"""SmoothGrad as a patchbench method plugin: the example of docs/adding-a-method.md.

SmoothGrad (Smilkov et al., 2017) averages input gradients over noisy copies of the image.
Gradients come from captum's ``Saliency``; pixel values are pooled into one score per patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from patchbench.methods import Method


class SmoothGrad(Method):
    """Mean |gradient| of the target logit over noisy copies, summed per patch.

    Args:
        adapter: The model (any image classifier: no tokens needed).
        n_samples: Noisy copies per image.
        noise: Noise std as a fraction of the image's value range.
        seed: Seed of the noise. Every image gets the same noise draws, so an image's map
            does not depend on its batch.
    """

    name = "smoothgrad"
    uses_gradients = True  # the base class then runs _attribute with autograd on

    def __init__(self, adapter, n_samples: int = 16, noise: float = 0.15, seed: int = 0) -> None:
        super().__init__(adapter)
        self.n_samples = n_samples
        self.noise = noise
        self.seed = seed

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        from captum.attr import Saliency

        b, n = images.shape[0], self.n_samples
        g = torch.Generator().manual_seed(self.seed)
        draws = torch.randn(n, *images.shape[1:], generator=g).to(images)
        span = (images.amax((1, 2, 3)) - images.amin((1, 2, 3))).view(b, 1, 1, 1, 1)
        noisy = (images.unsqueeze(1) + self.noise * span * draws.unsqueeze(0)).flatten(0, 1)
        grads = Saliency(self.adapter.model).attribute(noisy, target=target.repeat_interleave(n))
        pixel = grads.view(b, n, *images.shape[1:]).mean(1).sum(1, keepdim=True)  # [B, 1, H, W]
        ph, pw = self.adapter.patch_size
        self.adapter.model.zero_grad(set_to_none=True)
        return (F.avg_pool2d(pixel, (ph, pw)) * ph * pw).squeeze(1)
