"""Removal operators: how a patch is "removed" before the model sees the image.

Every operator gets the clean images once (``prepare``) and then any number of keep masks.
Pixel operators replace whole patches by a baseline image made once per image from the
clean image (never from an already perturbed one); ``drop`` leaves tokens out of the
sequence, so no out-of-distribution pixels are shown and fewer tokens cost less.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torchvision.transforms.functional as TF
from torch import Tensor

from patchbench.models.adapter import ImageAdapter, ViTAdapter
from patchbench.registry import Registry

OPERATORS: Registry[RemovalOperator] = Registry("operator")


class RemovalOperator:
    """Base class. Subclasses set ``name`` and override :meth:`__call__` (and ``prepare``).

    ``needs_tokens`` marks operators that work on a ViT's patch tokens (the others replace
    pixels and work on any image classifier).
    """

    name = "base"
    needs_tokens = False

    @classmethod
    def options_from_run(cls, run: Any, options: dict[str, Any]) -> dict[str, Any]:
        """The options to create this operator with in a run: the user's ``options``
        (``operator_options.<name>``), completed with what it takes from the run (the
        dataset's statistics, a seed, a trained artifact). The default takes nothing."""
        return options

    def prepare(self, adapter: ImageAdapter, images: Tensor, seeds: Tensor) -> Tensor | None:
        """Per-image state computed once from the clean images.

        Args:
            adapter: The model.
            images: Clean model inputs ``[B, 3, H, W]``.
            seeds: One int64 seed per image ``[B]``, so random baselines do not depend on
                the batch an image comes in.

        Returns:
            A tensor whose first dimension is B (rows are gathered per image), or None.
        """
        return None

    def __call__(
        self, adapter: ImageAdapter, images: Tensor, keep: Tensor, state: Tensor | None
    ) -> Tensor:
        """Logits ``[B, C]`` for ``images`` with the patches where ``keep`` ``[B, P]`` is False removed."""
        raise NotImplementedError

    def soft(self, adapter: ImageAdapter, images: Tensor, z: Tensor, state: Tensor | None) -> Tensor:
        """A continuous relaxation of the operator, for training an explainer against it.

        Args:
            adapter: The model.
            images: Clean model inputs ``[B, 3, H, W]``.
            z: How much of each patch is kept, ``[B, P]`` in [0, 1], differentiable.
            state: From :meth:`prepare`.

        Returns:
            Logits ``[B, C]``, equal to ``self(adapter, images, z.bool(), state)`` for binary ``z``.

        Raises:
            NotImplementedError: The operator has no relaxation.
        """
        raise NotImplementedError(f"the {self.name!r} operator has no continuous relaxation")

    def config(self) -> dict[str, Any]:
        return {"name": self.name}


class PixelOperator(RemovalOperator):
    """Replaces removed patches, whole, by the pixels of a per-image baseline image."""

    def baseline(self, adapter: ImageAdapter, images: Tensor, seeds: Tensor) -> Tensor:
        raise NotImplementedError

    def prepare(self, adapter: ImageAdapter, images: Tensor, seeds: Tensor) -> Tensor:
        return self.baseline(adapter, images, seeds)

    def __call__(
        self, adapter: ImageAdapter, images: Tensor, keep: Tensor, state: Tensor | None
    ) -> Tensor:
        return adapter.logits(composite(adapter, images, keep, state))

    def soft(self, adapter: ImageAdapter, images: Tensor, z: Tensor, state: Tensor | None) -> Tensor:
        """Each patch a blend of the clean image and the baseline: ``z·x + (1 − z)·b`` in pixels."""
        return adapter.logits(blend(adapter, images, z, state))


def composite(adapter: ImageAdapter, images: Tensor, keep: Tensor, baseline: Tensor) -> Tensor:
    """Images with the patches where ``keep`` ``[B, P]`` is False taken from ``baseline``."""
    return torch.where(adapter.patch_to_pixel(keep).bool(), images, baseline)


def blend(adapter: ImageAdapter, images: Tensor, z: Tensor, baseline: Tensor) -> Tensor:
    """Images whose patches are ``z·x + (1 − z)·b``: the relaxation of :func:`composite` for
    ``z`` ``[B, P]`` in [0, 1] (differentiable in ``z``; equal to it where ``z`` is binary)."""
    w = adapter.patch_to_pixel(z).to(images.dtype)
    return w * images + (1 - w) * baseline


@OPERATORS.register("mean")
class MeanOperator(PixelOperator):
    """Removed patches take the dataset's mean colour.

    Args:
        colour: Per-channel mean colour in model-input (normalised) space. In a run it is
            the dataset's training-split mean; without it, the model's normalisation mean
            (0 in normalised space) is used.
    """

    name = "mean"

    @classmethod
    def options_from_run(cls, run: Any, options: dict[str, Any]) -> dict[str, Any]:
        if "colour" not in options:  # the dataset's, not the evaluated images': see RunContext
            options["colour"] = tuple(run.mean_colour()["model_input"])
        return options

    def __init__(self, colour: tuple[float, ...] | None = None) -> None:
        self.colour = tuple(colour) if colour is not None else None

    def baseline(self, adapter: ImageAdapter, images: Tensor, seeds: Tensor) -> Tensor:
        colour = torch.tensor(self.colour or (0.0,) * images.shape[1], dtype=images.dtype,
                              device=images.device)
        return colour.view(1, -1, 1, 1).expand_as(images)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "colour": self.colour}


@OPERATORS.register("zero")
class ZeroOperator(PixelOperator):
    """Removed patches become black: pixel value 0 before normalisation."""

    name = "zero"

    def baseline(self, adapter: ImageAdapter, images: Tensor, seeds: Tensor) -> Tensor:
        black = adapter.normalize(torch.zeros(1, images.shape[1], 1, 1, device=images.device))
        return black.to(images.dtype).expand_as(images)


@OPERATORS.register("blur")
class BlurOperator(PixelOperator):
    """Removed patches take the pixels of a Gaussian-blurred copy of the clean image.

    Args:
        sigma: Blur standard deviation in patches (default one patch).
    """

    name = "blur"

    def __init__(self, sigma: float = 1.0) -> None:
        self.sigma = sigma

    def baseline(self, adapter: ImageAdapter, images: Tensor, seeds: Tensor) -> Tensor:
        sigma = self.sigma * max(adapter.patch_size)
        # reflect padding needs the kernel's half-width below the image size
        half = min(math.ceil(3 * sigma), min(images.shape[-2:]) - 1)
        return TF.gaussian_blur(images, [2 * half + 1] * 2, [sigma, sigma])

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "sigma_patches": self.sigma}


@OPERATORS.register("noise")
class NoiseOperator(PixelOperator):
    """Removed pixels take independent uniform random values, per pixel and channel.

    By default the values are U(0, 1) pixel intensities (then normalised). With
    ``space="normalised"`` they are drawn in the model's input space directly, as the
    DiffMask paper's evaluation did (U(-1, 1) there). The noise is drawn once per image
    from a generator seeded by ``(seed, image seed)``: the same image always gets the same
    noise, at every step and whatever batch it is in.

    Args:
        seed: Run seed mixed into every image's seed.
        space: ``pixel`` (values in [0, 1] before normalisation) or ``normalised``.
        low: Lower end of the uniform range (default 0 in pixel space, -1 in normalised).
        high: Upper end (default 1).
    """

    name = "noise"

    @classmethod
    def options_from_run(cls, run: Any, options: dict[str, Any]) -> dict[str, Any]:
        return {"seed": run.seed, **options}

    def __init__(self, seed: int = 0, space: str = "pixel", low: float | None = None,
                 high: float = 1.0) -> None:
        if space not in ("pixel", "normalised"):
            raise ValueError(f"noise space must be 'pixel' or 'normalised', got {space!r}")
        self.seed = seed
        self.space = space
        self.low = float(low if low is not None else (0.0 if space == "pixel" else -1.0))
        self.high = float(high)
        if not self.low < self.high:
            raise ValueError(f"noise range needs low < high, got [{self.low}, {self.high}]")

    def baseline(self, adapter: ImageAdapter, images: Tensor, seeds: Tensor) -> Tensor:
        if len(seeds) != images.shape[0]:
            raise ValueError(f"noise needs one seed per image: got {len(seeds)} seeds for "
                             f"{images.shape[0]} images")
        noise = torch.empty(images.shape, dtype=torch.float32)
        for i, s in enumerate(seeds.tolist()):
            g = torch.Generator().manual_seed(hash_seed(self.seed, s))
            noise[i] = torch.rand(images.shape[1:], generator=g)
        noise = (self.low + (self.high - self.low) * noise).to(images.device)
        if self.space == "pixel":
            noise = adapter.normalize(noise)
        return noise.to(images.dtype)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "space": self.space, "low": self.low,
                "high": self.high}


@OPERATORS.register("drop")
class DropOperator(RemovalOperator):
    """Removed patch tokens are left out of the sequence; kept ones keep their positions."""

    name = "drop"
    needs_tokens = True

    def __call__(
        self, adapter: ViTAdapter, images: Tensor, keep: Tensor, state: Tensor | None
    ) -> Tensor:
        return adapter.forward_kept(images, keep)

    def soft(self, adapter: ViTAdapter, images: Tensor, z: Tensor, state: Tensor | None) -> Tensor:
        """Every patch token stays, and ``log z`` is added to its attention logits as a key in
        every block: a token with ``z = 0`` is attended by none, as if left out."""
        return adapter.forward_soft_kept(images, z)


def hash_seed(*values: int) -> int:
    """A 63-bit seed from integers, stable across processes (unlike ``hash``)."""
    h = 1469598103934665603
    for v in values:
        for byte in int(v).to_bytes(8, "little", signed=True):
            h = ((h ^ byte) * 1099511628211) % (1 << 64)
    return h >> 1


def create_operator(name: str, **kwargs: Any) -> RemovalOperator:
    """Creates a removal operator by name (``list_operators()`` gives the names)."""
    return OPERATORS.create(name, **kwargs)


def list_operators(pattern: str = "*") -> list[str]:
    return OPERATORS.list(pattern)


@OPERATORS.register("zero_embedding")
class ZeroEmbeddingOperator(RemovalOperator):
    """Removed patches' input embeddings (the patch embedding, before the position
    embedding is added) are set to zero: the perturbation AttnLRP's evaluation describes."""

    name = "zero_embedding"
    needs_tokens = True

    def __call__(
        self, adapter: ViTAdapter, images: Tensor, keep: Tensor, state: Tensor | None
    ) -> Tensor:
        return self.soft(adapter, images, keep, state)

    def soft(self, adapter: ViTAdapter, images: Tensor, z: Tensor, state: Tensor | None) -> Tensor:
        """``z · h0``: exact for binary ``z`` (the blend of the embedding and zero)."""
        h0 = adapter.patch_embeddings(images)
        return adapter.forward_embeddings(h0 * z.unsqueeze(-1).to(h0.dtype))


@OPERATORS.register("placeholder")
class PlaceholderOperator(RemovalOperator):
    """Removed patches' embeddings are replaced by DiffMask's learned placeholder vector.

    This is the paper's own masked-KL view, what DiffMask was trained against; leaderboards
    score every method under the same operator, and the default one does not use this.

    Args:
        checkpoint: A DiffMask checkpoint (its placeholder is used), or
        vector: the placeholder ``[D]`` itself.
    """

    name = "placeholder"
    needs_tokens = True

    @classmethod
    def options_from_run(cls, run: Any, options: dict[str, Any]) -> dict[str, Any]:
        if options.get("checkpoint") is None and options.get("vector") is None:
            from patchbench.methods.diffmask import DiffMask  # the same explainer as the method's

            # the explainer trained with its learned placeholder: what this operator removes with
            dm_options = DiffMask.options_from_run(run.for_operator(cls.name, None),
                                                   run.method_options("diffmask"))
            options["checkpoint"] = dm_options["checkpoint"]
        return options

    def __init__(self, checkpoint: str | None = None, vector: Tensor | None = None) -> None:
        if (checkpoint is None) == (vector is None):
            raise ValueError("the placeholder operator needs exactly one of checkpoint= or vector=")
        if checkpoint is not None:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            vector = state["explainer"]["placeholder"]
        self.checkpoint = checkpoint
        self.vector = vector.detach().float()

    def __call__(
        self, adapter: ViTAdapter, images: Tensor, keep: Tensor, state: Tensor | None
    ) -> Tensor:
        h0 = adapter.patch_embeddings(images)
        if self.vector.shape != h0.shape[-1:]:
            raise ValueError(f"placeholder has shape {list(self.vector.shape)}, the model's "
                             f"patch embeddings {list(h0.shape[-1:])}")
        z = keep.unsqueeze(-1).to(h0.dtype)
        return adapter.forward_embeddings(h0 * z + self.vector.to(h0) * (1 - z))

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "checkpoint": self.checkpoint}
