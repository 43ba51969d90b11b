"""Shared fixtures: a tiny random ViT (fast) and the trained default model (cached)."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from patchbench.models import ViTAdapter


def tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    args.update(kwargs)
    return VisionTransformer(**args).eval()


@pytest.fixture(scope="session")
def tiny() -> ViTAdapter:
    """Randomly initialised 4x4-patch ViT on 16x16 images (grid 4x4, 5 classes)."""
    return ViTAdapter(tiny_vit())


@pytest.fixture(scope="session")
def glyphs_model():
    """The embedded default model trained on `glyphs` (trained once, then cached)."""
    from patchbench.models import load_model

    adapter, meta = load_model("pb-vit-tiny", "glyphs", progress=False)
    return adapter, meta
