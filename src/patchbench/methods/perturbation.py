"""Perturbation methods: patch occlusion and RISE, model-agnostic and batched.

Both replace patches of the image (in pixels) by a baseline and read the softmax probability
of the target class; they need nothing but the model's logits, so they work on any image
classifier.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from patchbench.methods.base import Method, register_method
from patchbench.models.adapter import ImageAdapter

BASELINES = ("zero", "black")


def _check_baseline(baseline: str) -> None:
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")


def _check_count(name: str, value: int) -> None:
    # bool is an int subclass: batch_size=True would silently mean 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _baseline_images(adapter: ImageAdapter, images: Tensor, baseline: str) -> Tensor:
    """What removed pixels become: 0 in model-input space (the normalisation mean colour) or
    black pixels (0 before normalisation), as integrated gradients' baselines."""
    if baseline == "zero":
        return torch.zeros_like(images)
    return adapter.normalize(torch.zeros_like(images))


def _target_probabilities(adapter: ImageAdapter, images: Tensor, target: Tensor) -> Tensor:
    """Softmax probability of ``target`` ``[B]`` for model inputs ``[B, 3, H, W]``."""
    return adapter.logits(images).float().softmax(-1).gather(1, target.view(-1, 1)).squeeze(1)


def _perturbed_probabilities(adapter: ImageAdapter, images: Tensor, target: Tensor, baseline: Tensor,
                             kept: Callable[[Tensor], Tensor], count: int, batch_size: int) -> Tensor:
    """Target probabilities of ``B·count`` perturbed images, ``batch_size`` per forward pass.

    Perturbed image ``k`` is image ``k // count`` with the patches where ``kept(k % count)``
    is False replaced by ``baseline``; ``kept`` maps ``n`` indices to ``[n, P]`` booleans.
    Only one chunk of perturbed images exists at a time. Returns ``[B, count]``.
    """
    b = images.shape[0]
    out = torch.empty(b * count, device=images.device)
    for start in range(0, b * count, batch_size):
        flat = torch.arange(start, min(start + batch_size, b * count), device=images.device)
        image, which = flat // count, flat % count
        keep = adapter.patch_to_pixel(kept(which).float()) > 0  # [n, 1, H, W]
        # where, not a blend: kept pixels stay bit-identical to the clean image
        perturbed = torch.where(keep, images[image], baseline[image])
        out[flat] = _target_probabilities(adapter, perturbed, target[image])
    return out.view(b, count)


@register_method("occlusion")
class OcclusionMethod(Method):
    """Drop in target probability when a single patch is replaced by a baseline.

    Every patch of every image is occluded on its own (``B·P`` perturbed images, run in
    chunks); relevance = p(target | image) − p(target | image with the patch occluded), so
    patches whose removal lowers the target probability rank first. Softmax probabilities
    rather than logits, as the faithfulness metrics: the method sees competing classes too.

    Args:
        adapter: The model (any image classifier).
        baseline: ``zero`` (0 in the model's input space: the normalisation mean colour) or
            ``black`` (black pixels).
        batch_size: Occluded images per forward pass.
    """

    name = "occlusion"

    def __init__(self, adapter: ImageAdapter, baseline: str = "zero", batch_size: int = 256) -> None:
        super().__init__(adapter)
        _check_baseline(baseline)
        _check_count("batch_size", batch_size)
        self.baseline = baseline
        self.batch_size = batch_size

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        p = self.adapter.num_patches
        clean = _target_probabilities(self.adapter, images, target)
        base = _baseline_images(self.adapter, images, self.baseline)
        all_but = ~torch.eye(p, dtype=torch.bool, device=images.device)  # row j keeps all but patch j
        occluded = _perturbed_probabilities(self.adapter, images, target, base, lambda j: all_but[j],
                                            p, self.batch_size)
        return (clean.unsqueeze(1) - occluded).view(-1, *self.adapter.grid)


@register_method("rise")
class RISEMethod(Method):
    """RISE (Petsiuk et al., 2018) on the patch grid: target probability under random masks.

    ``n_masks`` random binary masks over the patch grid keep each patch with probability
    ``keep``; removed patches are replaced by the baseline. The relevance of patch ``j`` is
    the mean target probability over the masks that keep it, ``Σ_n p_n·m_n[j] / Σ_n m_n[j]``
    (normalised by each patch's own count rather than RISE's expected count ``N·keep``, so it
    is an unbiased mean). The masks come from a generator seeded with ``seed`` and are the
    same for every image (``self.masks``), so a map does not depend on its batch. A patch that
    no mask keeps (likely only with a handful of masks) gets the mean probability over all
    masks: there is no evidence either way.

    Args:
        adapter: The model (any image classifier).
        n_masks: Number of random masks.
        keep: Probability that a mask keeps a patch, in (0, 1).
        baseline: ``zero`` (0 in the model's input space: the normalisation mean colour) or
            ``black`` (black pixels).
        seed: Seed of the masks.
        batch_size: Masked images per forward pass.
    """

    name = "rise"

    def __init__(self, adapter: ImageAdapter, n_masks: int = 256, keep: float = 0.5,
                 baseline: str = "zero", seed: int = 0, batch_size: int = 256) -> None:
        super().__init__(adapter)
        _check_count("n_masks", n_masks)
        # keep = 1 keeps every patch in every mask: the maps would be constant
        if not 0 < keep < 1:
            raise ValueError(f"keep must be in (0, 1), got {keep}")
        _check_baseline(baseline)
        _check_count("batch_size", batch_size)
        self.n_masks = n_masks
        self.keep = keep
        self.baseline = baseline
        self.seed = seed
        self.batch_size = batch_size
        # drawn on the CPU, where the generator lives: a seed gives the same masks on any device
        g = torch.Generator().manual_seed(seed)
        self.masks = torch.rand(n_masks, *adapter.grid, generator=g) < keep  # [N, Hp, Wp], True = kept

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        masks = self.masks.flatten(1).to(images.device)  # [N, P]
        base = _baseline_images(self.adapter, images, self.baseline)
        probs = _perturbed_probabilities(self.adapter, images, target, base, lambda n: masks[n],
                                         self.n_masks, self.batch_size)  # [B, N]
        weights = masks.float()
        counts = weights.sum(0)  # [P]
        mean_kept = (probs @ weights) / counts.clamp(min=1)
        mean_all = probs.mean(1, keepdim=True).expand_as(mean_kept)
        return torch.where(counts > 0, mean_kept, mean_all).view(-1, *self.adapter.grid)
