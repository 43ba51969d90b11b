"""The method contract and registry.

A method turns images into one relevance value per patch::

    maps = method.attribute(images, target)   # [B, 3, H, W], [B] -> [B, Hp, Wp]

Subclasses override only :meth:`Method._attribute`; :meth:`Method.attribute` checks the
inputs and the output (shape, dtype, finiteness) so no method has to.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from patchbench.models.adapter import ImageAdapter, NotAViTError
from patchbench.registry import Registry

if TYPE_CHECKING:
    from patchbench.context import RunContext

METHODS: Registry[Method] = Registry("method")


class MethodOutputError(ValueError):
    """A method returned something other than finite float maps ``[B, Hp, Wp]``."""


class Method:
    """Base class of attribution methods.

    Class attributes:
        name: Registry name.
        uses_gradients: Run ``_attribute`` with autograd enabled (otherwise ``no_grad``).
        needs_tokens: Needs a ViT's tokens or attention (a :class:`ViTAdapter`); methods
            without it work on any image classifier.
        sanity_checkable: Its maps can be recomputed on a randomised model (the sanity
            check); False for maps read from a file.
        trained_for_operator: It is trained against a removal operator (e.g. DiffMask): the
            run makes one instance per operator, through ``options_from_run`` with
            ``run.operator`` set, and scores each under its own operator (the others are
            reported as a transfer table).
        trained: It trains an artifact from a seed (e.g. DiffMask's explainer): the run
            makes one instance per seed in ``cfg.train_seeds`` (``run.train_seed`` set),
            scores each, and reports their mean per image with the range over seeds.
        chance_control: Its maps carry no information about the model (a chance level):
            normalised scores put it at 0, and the metric check compares the ground-truth
            mask with it. The run uses the first such method it scores.

    Args:
        adapter: The model to explain.
    """

    name = "base"
    uses_gradients = False
    needs_tokens = False
    sanity_checkable = True
    chance_control = False
    trained_for_operator = False
    trained = False
    sanity_note = ""  # why the sanity check does not apply, when sanity_checkable is False

    @classmethod
    def options_from_run(cls, run: RunContext, options: dict[str, Any]) -> dict[str, Any]:
        """The options to create this method with in a run: the user's ``options``, completed
        with what the method takes from the run (a seed, a trained artifact). The default
        takes nothing; override it rather than have the runner know about the method.

        Args:
            run: The run (seed, config, model, dataset, shared artifacts).
            options: The user's options (``method_options.<name>``), a copy.
        """
        return options

    @classmethod
    def options_for_model(cls, run: RunContext, options: dict[str, Any], adapter: Any) -> dict[str, Any]:
        """The options to create this method with for another model, ``adapter`` (the
        sanity check's randomised copies, and the trained model checked the same way). The
        default is the run's options: the maps are recomputed on the other model. A trained
        method (``trained``) retrains its artifact for ``adapter`` here, so that the check
        never reuses one trained for another model.

        Args:
            run: The run, as for ``options_from_run`` (with the instance's operator and seed).
            options: The options the run created the method with.
            adapter: The model to explain.
        """
        return options

    def __init__(self, adapter: ImageAdapter) -> None:
        if self.needs_tokens and not adapter.is_vit:
            raise NotAViTError(
                f"method {self.name!r} needs a vision transformer's patch tokens or attention, and "
                f"{type(adapter.model).__name__} is not one. Methods for any model: "
                f"{', '.join(token_free_methods())}.")
        self.adapter = adapter

    def attribute(self, images: Tensor, target: Tensor) -> Tensor:
        """Relevance of every patch for the target class.

        Args:
            images: Model inputs ``[B, 3, H, W]`` (normalised as the model expects).
            target: Class index per image ``[B]``.

        Returns:
            Float maps ``[B, Hp, Wp]``, finite, higher = more relevant. The map of an image
            does not depend on the other images in the batch.
        """
        self._check_inputs(images, target)
        grad = torch.enable_grad() if self.uses_gradients else torch.no_grad()
        with grad:
            maps = self._attribute(images, target)
        return self._check_output(maps, images.shape[0])

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def setup_seconds(self) -> float | None:
        """Seconds the method's one-off setup took (e.g. training an amortised explainer),
        or None when it has none; the leaderboard shows it beside the per-image cost."""
        return None

    def config(self) -> dict[str, Any]:
        """Name and constructor options (part of a result's provenance)."""
        params = inspect.signature(type(self).__init__).parameters
        opts = {p: getattr(self, p) for p in params if p not in ("self", "adapter")
                and hasattr(self, p)}
        return {"name": self.name, **opts}

    def _check_inputs(self, images: Tensor, target: Tensor) -> None:
        h, w = self.adapter.img_size
        if images.ndim != 4 or tuple(images.shape[2:]) != (h, w):
            raise ValueError(f"{self.name}: expected images [B, C, {h}, {w}], "
                             f"got {tuple(images.shape)}")
        if target.shape != (images.shape[0],):
            raise ValueError(f"{self.name}: expected target [{images.shape[0]}], "
                             f"got {tuple(target.shape)}")

    def _check_output(self, maps: Any, batch: int) -> Tensor:
        expected = (batch, *self.adapter.grid)
        if not isinstance(maps, Tensor):
            raise MethodOutputError(f"method {self.name!r} returned {type(maps).__name__}, "
                                    f"expected a tensor of shape {list(expected)}")
        if tuple(maps.shape) != expected:
            raise MethodOutputError(f"method {self.name!r} returned maps of shape "
                                    f"{list(maps.shape)}, expected {list(expected)}")
        if maps.is_complex() or maps.dtype == torch.bool:
            raise MethodOutputError(f"method {self.name!r} returned dtype {maps.dtype}, "
                                    "expected a real floating-point or integer tensor")
        maps = maps.detach().float()
        bad = ~torch.isfinite(maps)
        if bad.any():
            nans, infs = int(maps.isnan().sum()), int(bad.sum() - maps.isnan().sum())
            rows = bad.flatten(1).any(1).nonzero().flatten().tolist()
            raise MethodOutputError(f"method {self.name!r} returned {nans} NaN and {infs} "
                                    f"infinite values (images {rows[:10]} of the batch)")
        return maps


def register_method(name: str | None = None):
    """Class decorator registering a :class:`Method` subclass under ``name`` (default ``cls.name``)."""
    return METHODS.register(name)


def token_free_methods() -> list[str]:
    """Registered methods that work on any image classifier, not only ViTs."""
    return [n for n in METHODS.list() if not METHODS.get(n).needs_tokens]
