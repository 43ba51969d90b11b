"""The road and inpaint operators: ROAD's imputation against pytorch-grad-cam's, seeding, OpenCV."""

import pytest
import torch
from pytorch_grad_cam.metrics.road import NoisyLinearImputer

from patchbench.models import create_operator
from patchbench.models.imputation import linear_imputation
from patchbench.testing import tiny_adapter


def patch_masks(n: int, grid: int, patch: int, seed: int) -> torch.Tensor:
    """Random keep masks ``[n, grid*grid]``, with one all-removed and one all-kept row."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, grid * grid, generator=g) < 0.5
    keep[0], keep[1] = False, True
    return keep


def test_batched_imputation_equals_grad_cams_sparse_solver():
    adapter = tiny_adapter()  # 32 px, 8-px patches
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 32, 32, generator=g)
    keep = patch_masks(6, 4, 8, 1)
    removed = ~adapter.patch_to_pixel(keep).bool()
    ours = linear_imputation(images, removed)
    imputer = NoisyLinearImputer(noise=0.0)
    for i in range(len(images)):
        theirs = imputer(images[i], (~removed[i, 0]).float())
        # measured: 2e-7 (conjugate gradients in float64, stopped at 1e-6 of the residual)
        assert (ours[i] - theirs).abs().max() < 1e-5, i
    assert torch.equal(ours[~removed.expand_as(images)], images[~removed.expand_as(images)])


def test_road_noise_depends_on_the_image_and_mask_not_the_batch():
    adapter = tiny_adapter()
    road = create_operator("road", seed=3)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=g)
    keep = patch_masks(4, 4, 8, 2)
    seeds = road.prepare(adapter, images, torch.tensor([10, 11, 12, 13]))
    together = road.fill(adapter, images, keep, seeds)
    alone = torch.cat([road.fill(adapter, images[i:i + 1], keep[i:i + 1], seeds[i:i + 1]) for i in range(4)])
    assert torch.equal(together, alone)
    logits = road(adapter, images, keep, seeds)
    assert torch.allclose(logits, adapter.logits(together), atol=1e-6)
    # another mask of the same image draws other noise; the noise has the asked-for spread
    other = keep.clone()
    other[2, 0] = ~other[2, 0]
    removed = ~adapter.patch_to_pixel(keep).bool().expand_as(images)
    noise = (together - linear_imputation(images, removed[:, :1]))[removed]
    assert noise.std().item() == pytest.approx(0.01, rel=0.1)
    again = road.fill(adapter, images, other, seeds)
    both = removed[2] & ~adapter.patch_to_pixel(other).bool()[2].expand_as(images[2])
    assert not torch.allclose(again[2][both], together[2][both])


def test_inpaint_fills_from_the_kept_pixels_and_keeps_them_exactly():
    adapter = tiny_adapter()
    inpaint = create_operator("inpaint")
    colour = torch.tensor([0.2, 0.6, 0.9]).view(1, 3, 1, 1)
    flat = adapter.normalize(colour.expand(3, 3, 32, 32))
    g = torch.Generator().manual_seed(0)
    clean = adapter.normalize(torch.rand(3, 3, 32, 32, generator=g))
    images = torch.cat([flat, clean])
    keep = torch.ones(6, 16, dtype=torch.bool)
    keep[[0, 3], 5] = False  # one patch of a flat image and of a textured one
    keep[[1, 4]] = False  # everything removed
    out = inpaint.fill(adapter, images, keep, None)
    removed = ~adapter.patch_to_pixel(keep).bool().expand_as(images)
    assert torch.equal(out[~removed], images[~removed])
    step = 1 / 255 / min(adapter.std)  # one 8-bit level in model-input units
    # a flat image inpaints to its colour, to OpenCV's 8-bit rounding (measured: 2.5 levels)
    assert (out[0] - flat[0]).abs().max() <= 3 * step
    assert torch.equal(out[[1, 4]], torch.zeros_like(out[[1, 4]]))  # nothing to inpaint from
    assert not torch.allclose(out[3][removed[3]], clean[0][removed[3]])
    grey = inpaint.fill(adapter, images[:, :1].expand(-1, 3, -1, -1).contiguous(), keep, None)
    assert grey.shape == images.shape


@pytest.mark.parametrize("name", ["road", "inpaint"])
def test_imputing_operators_score_in_a_run(name, tmp_path, glyphs_model):
    from patchbench.bench import BenchConfig, run_benchmark

    cfg = BenchConfig(run=name, results_dir=str(tmp_path), datasets=("glyphs",), n_images=6, steps=4,
                      methods=("random", "attnlrp"), operators=(name,), sanity_images=0)
    out = run_benchmark(cfg, progress=False)
    assert out["failures"] == [] and set(out["scores"].operator) == {name, "-"}
    assert out["run"]["models"]["glyphs"]["operators"][name]["name"] == name
