"""VarGrad as a patchbench method plugin: the example of docs/adding-a-method.md.

VarGrad (Adebayo et al., 2018) is the variance of input gradients over noisy copies of the
image, where SmoothGrad (built in) takes their mean. Gradients come from captum's
``Saliency``; pixel values are pooled into one score per patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from patchbench.methods import Method


class VarGrad(Method):
    """Variance of the target logit's gradient over noisy copies, summed per patch.

    Args:
        adapter: The model (any image classifier: no tokens needed).
        n_samples: Noisy copies per image (at least 2: a variance needs two).
        noise: Noise std as a fraction of the image's value range.
        seed: Seed of the noise. Every image gets the same noise draws, so an image's map
            does not depend on its batch.
    """

    name = "vargrad"
    uses_gradients = True  # the base class then runs _attribute with autograd on

    def __init__(self, adapter, n_samples: int = 16, noise: float = 0.15, seed: int = 0) -> None:
        super().__init__(adapter)
        if n_samples < 2:
            raise ValueError(f"n_samples must be at least 2, got {n_samples}")
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
        noisy.requires_grad_(True)
        grads = Saliency(self.adapter.model).attribute(noisy, target=target.repeat_interleave(n),
                                                       abs=False)
        pixel = grads.view(b, n, *images.shape[1:]).var(1).sum(1, keepdim=True)  # [B, 1, H, W]
        ph, pw = self.adapter.patch_size
        self.adapter.model.zero_grad(set_to_none=True)
        return (F.avg_pool2d(pixel, (ph, pw)) * ph * pw).squeeze(1)
