"""Contract checks for attribution methods, for plugin authors and for our own methods.

::

    from patchbench.testing import check_method
    check_method("vargrad")                     # on a small random ViT
    check_method(MyMethod, adapter, n_samples=8)   # a class, your model, its options

Checks: maps are ``[B, Hp, Wp]``, finite floats; an image's map does not depend on the rest
of its batch; the same seed gives the same maps; hooks are released, also when the model
raises mid-call; the model's mode, ``requires_grad`` flags and gradients are left as found.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from patchbench.methods.base import METHODS, Method
from patchbench.models.adapter import ImageAdapter, ViTAdapter
from patchbench.utils import seed_everything


class ContractError(AssertionError):
    """A method breaks the method contract; the message lists every broken rule."""


def tiny_adapter(seed: int = 0, num_classes: int = 5) -> ViTAdapter:
    """A small random timm ViT (32 px, 8-px patches, 2 blocks) whose outputs vary by image."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              mlp_ratio=2.0, num_classes=num_classes)
    with torch.no_grad():  # timm's init gives near-constant logits; make them image-dependent
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ViTAdapter(model, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), key=f"tiny-random-{seed}")


def check_method(method: str | type[Method], adapter: ImageAdapter | None = None,
                 images: Tensor | None = None, target: Tensor | None = None,
                 atol: float = 1e-5, rtol: float = 1e-4, **options: Any) -> Tensor:
    """Runs the contract checks on a method and raises :class:`ContractError` listing failures.

    Args:
        method: A registered name or a :class:`Method` subclass.
        adapter: The model (default: :func:`tiny_adapter`).
        images: Model inputs ``[B, 3, H, W]`` with B ≥ 3 (default: 4 seeded random images).
        target: Classes ``[B]`` (default: 0, 1, 2, ...).
        atol: Absolute tolerance of the batch-independence check.
        rtol: Relative tolerance of the batch-independence check.
        **options: Constructor options of the method.

    Returns:
        The maps of the batch ``[B, Hp, Wp]`` (to look at, or to check further).
    """
    adapter = adapter or tiny_adapter()
    if images is None:
        g = torch.Generator().manual_seed(0)
        images = adapter.normalize(torch.rand(4, 3, *adapter.img_size, generator=g))
    images = images.to(adapter.device)
    if target is None:
        target = torch.arange(images.shape[0]) % adapter.num_classes
    target = target.to(images.device)
    cls = METHODS.get(method) if isinstance(method, str) else method
    problems: list[str] = []

    def make() -> Method:
        return cls(adapter, **options)

    model = adapter.model
    grads_before = [p.grad is None for p in model.parameters()]
    flags_before = [p.requires_grad for p in model.parameters()]
    hooks_before = _hook_count(model)
    seed_everything(0)
    maps = make().attribute(images, target)  # the base class checks shape, dtype and finiteness
    expected = (images.shape[0], *adapter.grid)
    if tuple(maps.shape) != expected or not torch.isfinite(maps).all():
        problems.append(f"maps are {tuple(maps.shape)} (finite: {bool(torch.isfinite(maps).all())}), "
                        f"expected finite {expected}")
    if _hook_count(model) != hooks_before:
        problems.append(f"hooks left on the model: {_hook_count(model) - hooks_before}")
    if [p.requires_grad for p in model.parameters()] != flags_before:
        problems.append("requires_grad flags of the model were changed")
    if [p.grad is None for p in model.parameters()] != grads_before:
        problems.append("gradients were left on the model's parameters (zero_grad(set_to_none=True))")
    if model.training:
        problems.append("the model was left in training mode")

    seed_everything(0)
    again = make().attribute(images, target)
    if not torch.equal(again, maps):
        problems.append(f"not deterministic under a seed: max difference {_diff(again, maps):.3g} "
                        "between two runs after the same seed_everything(0)")

    seed_everything(0)
    alone = torch.cat([make().attribute(images[i:i + 1], target[i:i + 1]) for i in range(len(images))])
    seed_everything(0)
    reversed_batch = make().attribute(images.flip(0), target.flip(0)).flip(0)
    for what, other in (("one at a time", alone), ("in reverse batch order", reversed_batch)):
        if not torch.allclose(other, maps, atol=atol, rtol=rtol):
            problems.append(f"maps depend on the rest of the batch: {what} they differ by up to "
                            f"{_diff(other, maps):.3g} (atol {atol}, rtol {rtol})")

    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]

    def fail(*_: Any) -> None:
        raise _Injected("injected failure")

    handle = head.register_forward_hook(fail)
    try:
        make().attribute(images, target)
    except _Injected:
        pass
    except Exception as e:  # the method may wrap the error; the hooks still must go
        if "injected failure" not in str(e):
            problems.append(f"the injected failure came back as an unrelated error: {e!r}")
    finally:
        handle.remove()
    if _hook_count(model) != hooks_before:
        problems.append(f"hooks left on the model after an exception: {_hook_count(model) - hooks_before}")
    if [p.requires_grad for p in model.parameters()] != flags_before:
        problems.append("requires_grad flags not restored after an exception")

    if problems:
        name = method if isinstance(method, str) else cls.__name__
        raise ContractError(f"method {name!r} breaks the contract:\n- " + "\n- ".join(problems))
    return maps


class _Injected(RuntimeError):
    pass


def _hook_count(model: nn.Module) -> int:
    attrs = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, a, {})) for m in model.modules() for a in attrs) + sum(
        len(getattr(p, "_backward_hooks", None) or {}) for p in model.parameters())


def _diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())
