"""Continuous relaxations of the removal operators (what DiffMask trains against): each equals
its operator on binary masks, and is differentiable in the mask."""

from __future__ import annotations

import pytest
import torch

from patchbench.models import create_operator

OPERATORS = {"mean": {"colour": (0.3, -0.2, 0.1)}, "zero": {}, "blur": {}, "noise": {"seed": 4},
             "drop": {}, "road": {"seed": 4}, "inpaint": {}}


@pytest.mark.parametrize("name", list(OPERATORS))
def test_soft_equals_the_operator_on_binary_masks(name, tiny):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 16, 16, generator=g)
    keep = torch.rand(6, tiny.num_patches, generator=g) > 0.5
    keep[0] = False  # nothing kept
    keep[1] = True  # everything kept
    op = create_operator(name, **OPERATORS[name])
    state = op.prepare(tiny, images, torch.arange(6))
    with torch.no_grad():
        hard = op(tiny, images, keep, state)
        soft = op.soft(tiny, images, keep.float(), state)
    torch.testing.assert_close(soft, hard, atol=1e-4, rtol=0)
    assert (hard[2:] - hard[2:].mean(0)).abs().max() > 1e-3  # the masks change the logits


@pytest.mark.parametrize("name", list(OPERATORS))
def test_soft_is_differentiable_in_the_mask(name, tiny):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 16, 16, generator=g)
    z = torch.rand(3, tiny.num_patches, generator=g).requires_grad_(True)
    op = create_operator(name, **OPERATORS[name])
    op.soft(tiny, images, z, op.prepare(tiny, images, torch.arange(3)))[:, 0].sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().max() > 0


def test_soft_drop_needs_a_class_token_head(tiny):
    from timm.models.vision_transformer import VisionTransformer

    from patchbench.models.adapter import ViTAdapter

    pooled = ViTAdapter(VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                                          num_classes=3, class_token=False, global_pool="avg"))
    with pytest.raises(ValueError, match="class token"):
        create_operator("drop").soft(pooled, torch.randn(1, 3, 16, 16), torch.ones(1, 16), None)


def test_soft_drop_is_exact_on_the_trained_default_model(glyphs_model):
    from patchbench.datasets import create_dataset

    adapter = glyphs_model[0]
    images = adapter.prepare(create_dataset("glyphs", "test", seed=0).tensors(list(range(32)))[0])
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(32, adapter.num_patches, generator=g) > torch.rand(32, 1, generator=g)
    op = create_operator("drop")
    with torch.no_grad():
        hard, soft = op(adapter, images, keep, None), op.soft(adapter, images, keep.float(), None)
    torch.testing.assert_close(soft.log_softmax(-1), hard.log_softmax(-1), atol=1e-4, rtol=0)
