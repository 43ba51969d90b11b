"""Removal by imputation: ROAD's noisy linear imputation and OpenCV inpainting.

Both fill the removed patches from the kept pixels of the same image, so the image stays
closer to the data than under a flat colour; how much closer, and whether it changes the
ranking, is what the rank-stability table measures (Blücher et al., 2024, find that the
occlusion strategy decides rankings).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from patchbench.models.adapter import ImageAdapter
from patchbench.models.removal import OPERATORS, RemovalOperator, blend, hash_seed

# ROAD's neighbour weights: 1/6 for the 4 direct neighbours, 1/12 for the 4 diagonal ones
ROAD_STENCIL = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])


def linear_imputation(images: Tensor, removed: Tensor, tol: float = 1e-6,
                      max_iter: int | None = None) -> Tensor:
    """ROAD's linear imputation for many images at once: every removed pixel equals the
    weighted mean of its in-image neighbours (:data:`ROAD_STENCIL`, renormalised at the
    border), solved jointly over the removed pixels of each image and channel.

    The system is symmetric positive definite whenever an image keeps a pixel, so it is solved
    by conjugate gradients on the 3×3 stencil, batched over images and channels; an image
    with nothing kept has no solution to anchor it and gets zeros (as SciPy's solver returns).
    Each system stops on its own residual, and the stencil is sums of shifted copies, so an
    image's result does not depend on the others in the batch.

    Args:
        images: ``[R, C, H, W]``.
        removed: ``[R, 1, H, W]`` (or ``[R, C, H, W]``) bool, True where a pixel is imputed.
        tol: Stop when every system's residual norm is below ``tol`` times its right-hand side's.
        max_iter: At most this many iterations (default ``4 · (H + W)``).

    Returns:
        ``[R, C, H, W]``: the images with their removed pixels imputed (kept pixels as given).
    """
    h, w = images.shape[-2:]
    x64 = images.double()
    m = removed.expand_as(images).to(x64.dtype)
    taps = [(dy, dx, float(ROAD_STENCIL[dy + 1, dx + 1])) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
            if dy or dx]

    def neighbours(u: Tensor) -> Tensor:  # Σ weight · neighbour, zero outside the image
        padded = F.pad(u, (1, 1, 1, 1))
        return sum(wt * padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx, wt in taps)

    degree = neighbours(torch.ones(1, 1, h, w, dtype=x64.dtype, device=x64.device))

    def apply(u: Tensor) -> Tensor:  # the system's matrix on the removed pixels
        return m * (degree * u - neighbours(m * u))

    b = m * neighbours(x64 * (1 - m))
    u = torch.zeros_like(b)
    res, p = b.clone(), b.clone()
    rs = (res * res).sum((2, 3), keepdim=True)
    stop = (tol ** 2) * rs
    for _ in range(max_iter or 4 * (h + w)):
        active = rs > stop  # a converged system keeps its iterate
        if not bool(active.any()):
            break
        ap = apply(p)
        curvature = (p * ap).sum((2, 3), keepdim=True)
        alpha = torch.where(active & (curvature > 0), rs / curvature.clamp_min(1e-300), 0.0)
        u = u + alpha * p
        res = res - alpha * ap
        rs_new = (res * res).sum((2, 3), keepdim=True)
        beta = torch.where(active & (rs > 0), rs_new / rs.clamp_min(1e-300), 0.0)
        p = torch.where(active, res + beta * p, p)
        rs = torch.where(active, rs_new, rs)
    return torch.where(m.bool(), u, x64).to(images.dtype)


def mask_seeds(seed: int, image_seeds: Tensor, keep: Tensor) -> list[int]:
    """One seed per row from the run's seed, the image's seed and the keep mask's bits: a
    row's noise depends on what it is, never on the batch it is in."""
    bits = np.packbits(keep.cpu().numpy().astype(bool), axis=1)
    return [hash_seed(seed, int(s), int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(),
                                                   "little", signed=True))
            for s, row in zip(image_seeds.tolist(), bits)]


class ImputingOperator(RemovalOperator):
    """Fills the removed patches from the kept pixels of the same image (subclasses: :meth:`fill`)."""

    def fill(self, adapter: ImageAdapter, images: Tensor, keep: Tensor, state: Tensor | None) -> Tensor:
        """The model inputs ``[B, C, H, W]`` with the patches where ``keep`` ``[B, P]`` is False filled."""
        raise NotImplementedError

    def __call__(self, adapter: ImageAdapter, images: Tensor, keep: Tensor, state: Tensor | None) -> Tensor:
        return adapter.logits(self.fill(adapter, images, keep, state))

    def soft(self, adapter: ImageAdapter, images: Tensor, z: Tensor, state: Tensor | None) -> Tensor:
        """Each patch a blend ``z·x + (1 − z)·f`` of the clean image and the filled one, where
        ``f`` fills every patch not wholly kept (z < 1) from the wholly kept ones. ``f`` is held
        constant in z (it changes only where a patch crosses z = 1), so the gradient flows
        through the blend, as for the pixel operators; for binary z this is the operator."""
        with torch.no_grad():
            filled = self.fill(adapter, images, z.detach() >= 1, state)
        return adapter.logits(blend(adapter, images, z, filled))


@OPERATORS.register("road")
class RoadOperator(ImputingOperator):
    """ROAD's noisy linear imputation (Rong et al., ICML 2022) of the removed patches.

    Each removed pixel is the weighted mean of its 8 neighbours (direct 1/6, diagonal 1/12),
    solved for all removed pixels of an image together (:func:`linear_imputation`), plus
    Gaussian noise in model-input units (ROAD's default std 0.01). The noise is drawn from a
    generator seeded by (run seed, image seed, keep mask), so scores do not depend on the batch.

    Args:
        noise: Standard deviation of the noise added to imputed pixels.
        seed: Run seed mixed into every row's seed.
    """

    name = "road"

    @classmethod
    def options_from_run(cls, run: Any, options: dict[str, Any]) -> dict[str, Any]:
        return {"seed": run.seed, **options}

    def __init__(self, noise: float = 0.01, seed: int = 0) -> None:
        if noise < 0:
            raise ValueError(f"noise must be 0 or more, got {noise}")
        self.noise = float(noise)
        self.seed = seed

    def prepare(self, adapter: ImageAdapter, images: Tensor, seeds: Tensor) -> Tensor:
        return seeds.to(torch.int64).clone()

    def fill(self, adapter: ImageAdapter, images: Tensor, keep: Tensor, state: Tensor | None) -> Tensor:
        """The model inputs ``[B, C, H, W]`` with the patches where ``keep`` is False imputed."""
        removed = ~adapter.patch_to_pixel(keep).bool()
        filled = linear_imputation(images.float(), removed)
        if self.noise:
            seeds = state if state is not None else torch.zeros(len(images), dtype=torch.int64)
            noise = torch.stack([torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(s))
                                 for s in mask_seeds(self.seed, seeds, keep)])
            filled = torch.where(removed, filled + self.noise * noise.to(filled.device), filled)
        return filled.to(images.dtype)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "noise": self.noise, "seed": self.seed}


@OPERATORS.register("inpaint")
class InpaintOperator(ImputingOperator):
    """Removed patches filled by OpenCV inpainting from the kept pixels (Telea, 2004).

    The image is inpainted in 8-bit pixels (OpenCV's requirement); kept pixels are the
    clean image's, exactly. An image with every patch removed has nothing to inpaint from and
    becomes the model's normalisation mean (0 in model input).

    Args:
        radius: Neighbourhood radius in pixels.
        method: ``telea`` or ``ns`` (Navier-Stokes, Bertalmio et al., 2001).
    """

    name = "inpaint"

    def __init__(self, radius: int = 3, method: str = "telea") -> None:
        if method not in ("telea", "ns"):
            raise ValueError(f"inpaint method must be 'telea' or 'ns', got {method!r}")
        if radius < 1:
            raise ValueError(f"inpaint radius must be at least 1 pixel, got {radius}")
        self.radius = int(radius)
        self.method = method

    def fill(self, adapter: ImageAdapter, images: Tensor, keep: Tensor, state: Tensor | None) -> Tensor:
        """The model inputs ``[B, C, H, W]`` with the patches where ``keep`` is False inpainted."""
        import cv2  # opencv-python-headless: imported when used (start-up time)

        flag = cv2.INPAINT_TELEA if self.method == "telea" else cv2.INPAINT_NS
        removed = ~adapter.patch_to_pixel(keep).bool()
        mean = torch.tensor(adapter.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(adapter.std, device=images.device).view(1, -1, 1, 1)
        pixels = ((images.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        holes = (removed[:, 0].to(torch.uint8) * 255).cpu().numpy()
        filled = torch.zeros_like(images, dtype=torch.float32)
        for i, (img, hole) in enumerate(zip(pixels.permute(0, 2, 3, 1).cpu().numpy(), holes)):
            if hole.all():
                continue  # nothing kept: the normalisation mean (set below)
            out = cv2.inpaint(np.ascontiguousarray(img), hole, self.radius, flag)
            out = out.reshape(img.shape)  # OpenCV drops the channel axis of 1-channel images
            filled[i] = adapter.normalize(torch.from_numpy(out).permute(2, 0, 1)[None].float() / 255)[0]
        return torch.where(removed, filled.to(images), images)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "radius": self.radius, "method": self.method}
