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


@pytest.fixture
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def one_thread():
    # the models are tiny: intra-op threads only cost time, a lot on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def make_method(tmp_path_factory):
    """create_method that also works for methods needing training (DiffMask: a few steps)."""
    from patchbench.methods import create_method
    from patchbench.methods.diffmask_train import DiffMaskConfig, save_explainer, train_diffmask

    checkpoints = {}

    def make(name, adapter, **options):
        if name == "diffmask" and "checkpoint" not in options:
            key = id(adapter)
            if key not in checkpoints:
                cfg = DiffMaskConfig(steps=5, batch_size=4)
                images = torch.randn(16, 3, *adapter.img_size)
                explainer, _ = train_diffmask(adapter, images, cfg, progress=False)
                path = tmp_path_factory.mktemp("diffmask") / "explainer.pt"
                save_explainer(path, explainer, adapter, "random", cfg, {})
                checkpoints[key] = path
            options["checkpoint"] = checkpoints[key]
        return create_method(name, adapter, **options)

    return make
