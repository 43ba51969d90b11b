"""Removal operators (mean, zero, blur, noise, drop) on a tiny random timm ViT."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from patchbench.models import ViTAdapter, create_operator, list_operators
from patchbench.models.removal import composite
from patchbench.registry import UnknownNameError

IMG = (16, 24)
PATCH = 4
BATCH = 4
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PIXEL_OPS = ["mean", "zero", "blur", "noise"]
ALL_OPS = [*PIXEL_OPS, "drop"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def adapter() -> ViTAdapter:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2,
                              num_classes=5)
    with torch.no_grad():  # timm's init gives near-constant logits
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return ViTAdapter(model.eval(), mean=MEAN, std=STD)


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(BATCH, 3, *IMG)


@pytest.fixture(scope="module")
def images(adapter, pixels) -> torch.Tensor:
    return adapter.normalize(pixels)


@pytest.fixture(scope="module")
def seeds() -> torch.Tensor:
    return torch.tensor([11, 22, 33, 44])


@pytest.fixture(scope="module")
def keep(adapter) -> torch.Tensor:
    """Random masks with different numbers of kept patches per row, each with kept and removed."""
    torch.manual_seed(2)
    p = adapter.num_patches
    mask = torch.zeros(BATCH, p, dtype=torch.bool)
    for i, c in enumerate([p // 2, 1, p - 1, p // 3]):
        mask[i, torch.randperm(p)[:c]] = True
    return mask


pytestmark = pytest.mark.usefixtures("no_grad", "one_thread")


def patch_slices(adapter: ViTAdapter, p: int) -> tuple[slice, slice]:
    r, c = divmod(p, adapter.grid[1])
    ph, pw = adapter.patch_size
    return slice(r * ph, (r + 1) * ph), slice(c * pw, (c + 1) * pw)


def composite_by_hand(adapter, images, keep, baseline) -> torch.Tensor:
    out = baseline.expand_as(images).clone()
    for b in range(images.shape[0]):
        for p in keep[b].nonzero().squeeze(1).tolist():
            rs, cs = patch_slices(adapter, p)
            out[b, :, rs, cs] = images[b, :, rs, cs]
    return out


def removed_pixels(adapter, composited, keep) -> torch.Tensor:
    """Pixels of removed patches, ``[3, n]``."""
    removed = ~adapter.patch_to_pixel(keep).bool().expand_as(composited)
    return composited.transpose(0, 1)[removed.transpose(0, 1)].view(composited.shape[1], -1)


def per_channel(values) -> torch.Tensor:
    return torch.tensor(values).view(1, -1, 1, 1)


# ---- pixel operators: composition ------------------------------------------------------------
@pytest.mark.parametrize("name", PIXEL_OPS)
def test_pixel_operator_replaces_whole_patches_by_baseline(name, adapter, images, seeds, keep):
    op = create_operator(name)
    state = op.prepare(adapter, images, seeds)
    assert state.shape[0] == BATCH
    baseline = state.expand_as(images)
    assert (baseline - images).abs().amax(dim=(1, 2, 3)).min() > 0.1  # the baseline differs

    out = composite(adapter, images, keep, state)
    assert out.shape == images.shape
    for b in range(BATCH):
        for p in range(adapter.num_patches):
            rs, cs = patch_slices(adapter, p)
            source = images if keep[b, p] else baseline
            assert torch.equal(out[b, :, rs, cs], source[b, :, rs, cs]), (b, p, bool(keep[b, p]))
    by_hand = composite_by_hand(adapter, images, keep, state)
    assert torch.equal(out, by_hand)
    torch.testing.assert_close(op(adapter, images, keep, state), adapter.model(by_hand),
                               atol=ATOL, rtol=0)


def test_mean_default_is_normalisation_mean(adapter, images, seeds, keep):
    op = create_operator("mean")
    out = composite(adapter, images, keep, op.prepare(adapter, images, seeds))
    removed = removed_pixels(adapter, out, keep)
    assert removed.shape[1] > 0 and torch.equal(removed, torch.zeros_like(removed))
    pixel_values = removed_pixels(adapter, out * per_channel(STD) + per_channel(MEAN), keep)
    torch.testing.assert_close(pixel_values, torch.tensor(MEAN).view(3, 1).expand_as(pixel_values))


def test_mean_with_colour_fills_removed_patches(adapter, images, seeds, keep):
    colour = (0.25, -1.5, 0.75)
    op = create_operator("mean", colour=colour)
    assert op.config() == {"name": "mean", "colour": colour}
    out = composite(adapter, images, keep, op.prepare(adapter, images, seeds))
    removed = removed_pixels(adapter, out, keep)
    assert removed.shape[1] > 0
    assert torch.equal(removed, torch.tensor(colour).view(3, 1).expand_as(removed))


def test_zero_is_black_in_pixel_space(adapter, images, seeds, keep):
    op = create_operator("zero")
    state = op.prepare(adapter, images, seeds)
    black = adapter.normalize(torch.zeros(1, 3, 1, 1))
    torch.testing.assert_close(state.expand_as(images), black.expand_as(images))
    out = composite(adapter, images, keep, state)
    removed = removed_pixels(adapter, out * per_channel(STD) + per_channel(MEAN), keep)
    torch.testing.assert_close(removed, torch.zeros_like(removed), atol=1e-6, rtol=0)


def test_blur_baseline(adapter, pixels, images, seeds):
    op = create_operator("blur")
    blurred = op.prepare(adapter, images, seeds)
    assert blurred.shape == images.shape
    assert (blurred - images).abs().amax(dim=(1, 2, 3)).min() > 0.5
    torch.testing.assert_close(blurred.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=0.1, rtol=0)
    assert (blurred.std(dim=(2, 3)) < 0.5 * images.std(dim=(2, 3))).all()  # smoother
    # one image at a time gives the same result (no mixing across the batch)
    for i in range(BATCH):
        torch.testing.assert_close(op.prepare(adapter, images[i:i + 1], seeds[i:i + 1])[0], blurred[i])
    # a constant image stays constant
    flat = adapter.normalize(torch.full((1, 3, *IMG), 0.3))
    torch.testing.assert_close(op.prepare(adapter, flat, seeds[:1]), flat)
    # a wider blur is smoother
    wider = create_operator("blur", sigma=2.0).prepare(adapter, images, seeds)
    assert (wider.std(dim=(2, 3)) < blurred.std(dim=(2, 3))).all()


# ---- noise -----------------------------------------------------------------------------------
def test_noise_depends_only_on_seeds(adapter, images, seeds):
    op = create_operator("noise", seed=7)
    noise = op.prepare(adapter, images, seeds)
    assert noise.shape == images.shape
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(op.prepare(adapter, images[perm], seeds[perm]), noise[perm])
    assert torch.equal(op.prepare(adapter, images[1:2], seeds[1:2]), noise[1:2])
    # a batch mixing in other images and seeds
    mixed_seeds = torch.tensor([99, 33, 5])
    assert torch.equal(op.prepare(adapter, images[:3], mixed_seeds)[1], noise[2])
    # not a function of the image content, and the same for a new instance
    assert torch.equal(op.prepare(adapter, torch.zeros_like(images), seeds), noise)
    assert torch.equal(create_operator("noise", seed=7).prepare(adapter, images, seeds), noise)


def test_noise_differs_with_seeds(adapter, images, seeds):
    noise = create_operator("noise", seed=7).prepare(adapter, images, seeds)
    other_run = create_operator("noise", seed=8).prepare(adapter, images, seeds)
    other_images = create_operator("noise", seed=7).prepare(adapter, images, seeds + 1)
    for i in range(BATCH):
        assert not torch.equal(noise[i], other_run[i])
        assert not torch.equal(noise[i], other_images[i])
        for j in range(i):
            assert not torch.equal(noise[i], noise[j])


def test_noise_is_uniform_in_pixel_range(adapter, images, seeds):
    noise = create_operator("noise").prepare(adapter, images, seeds)
    low, high = adapter.normalize(torch.zeros(1, 3, 1, 1)), adapter.normalize(torch.ones(1, 3, 1, 1))
    assert (noise >= low - 1e-6).all() and (noise <= high + 1e-6).all()
    pixel_values = noise * per_channel(STD) + per_channel(MEAN)
    assert pixel_values.min() < 0.02 and pixel_values.max() > 0.98
    assert abs(pixel_values.mean().item() - 0.5) < 0.03


# ---- all operators ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_OPS)
def test_keep_all_gives_clean_logits(name, adapter, images, seeds):
    op = create_operator(name)
    state = op.prepare(adapter, images, seeds)
    everything = torch.ones(BATCH, adapter.num_patches, dtype=torch.bool)
    torch.testing.assert_close(op(adapter, images, everything, state), adapter.model(images),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ALL_OPS)
def test_rows_independent_of_batch(name, adapter, images, seeds, keep):
    op = create_operator(name)
    full = op(adapter, images, keep, op.prepare(adapter, images, seeds))
    assert full.shape == (BATCH, adapter.num_classes)
    assert (full - adapter.model(images)).abs().amax(1).min() > 1e-3  # removal matters
    for i in range(BATCH):
        row = slice(i, i + 1)
        single = op(adapter, images[row], keep[row], op.prepare(adapter, images[row], seeds[row]))
        torch.testing.assert_close(single[0], full[i], atol=ATOL, rtol=0)
    perm = torch.tensor([3, 1, 0, 2])
    permuted = op(adapter, images[perm], keep[perm], op.prepare(adapter, images[perm], seeds[perm]))
    torch.testing.assert_close(permuted, full[perm], atol=ATOL, rtol=0)


def test_drop_leaves_tokens_out(adapter, images, seeds, keep):
    op = create_operator("drop")
    assert op.prepare(adapter, images, seeds) is None
    torch.testing.assert_close(op(adapter, images, keep, None), adapter.forward_kept(images, keep),
                               atol=ATOL, rtol=0)
    # not the same as showing any pixel baseline
    zero = create_operator("zero")
    zeroed = zero(adapter, images, keep, zero.prepare(adapter, images, seeds))
    assert (op(adapter, images, keep, None) - zeroed).abs().max() > 1e-3


# ---- registry --------------------------------------------------------------------------------
def test_operators_are_registered():
    assert set(ALL_OPS) <= set(list_operators())
    for name in ALL_OPS:
        assert create_operator(name).name == name
    assert create_operator("noise", seed=3).config() == {"name": "noise", "seed": 3, "space": "pixel",
                                                         "low": 0.0, "high": 1.0}
    assert create_operator("blur", sigma=0.5).config() == {"name": "blur", "sigma_patches": 0.5}


@pytest.mark.parametrize(("typo", "suggestion"), [("blurr", "blur"), ("nosie", "noise"), ("zeros", "zero")])
def test_unknown_operator_lists_names_and_suggests(typo, suggestion):
    with pytest.raises(UnknownNameError) as e:
        create_operator(typo)
    msg = str(e.value)
    assert f"unknown operator {typo!r}" in msg
    assert f"Did you mean {suggestion!r}" in msg
    valid = msg.split("Valid operators:")[1]
    for name in ALL_OPS:
        assert name in valid


def test_noise_needs_one_seed_per_image(tiny):
    images = tiny.normalize(torch.rand(4, 3, *tiny.img_size))
    with pytest.raises(ValueError, match="one seed per image: got 1 seeds for 4 images"):
        create_operator("noise").prepare(tiny, images, torch.tensor([0]))
