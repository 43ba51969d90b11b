"""Cascading model-parameter randomisation (bench/sanity.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_vit
from scipy import stats

from patchbench.bench.sanity import (
    map_similarity,
    randomisation_check,
    randomisation_stages,
    randomised_copy,
    sanity_verdicts,
)
from patchbench.methods import Method, create_method
from patchbench.models import ViTAdapter

pytestmark = pytest.mark.usefixtures("one_thread")


def _factory(name, **options):
    return lambda a: create_method(name, a, **options)


def _state(adapter):
    return {k: v.detach().clone() for k, v in adapter.model.state_dict().items()}


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture
def trained_like():
    """A tiny ViT with LayerScale whose every parameter is perturbed, as training would: no
    parameter then equals its initial value, so every re-initialisation must show."""
    model = tiny_vit(depth=3, init_values=0.1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return ViTAdapter(model, key="tiny-trained")


def _inputs(adapter, n=12, seed=3):
    x = torch.randn(n, 3, *adapter.img_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, adapter.logits(x).argmax(1)


# ---- map_similarity --------------------------------------------------------------------------
@pytest.mark.parametrize("ties", [False, True])
def test_map_similarity_matches_scipy_spearman(ties):
    g = torch.Generator().manual_seed(0)
    if ties:  # few distinct values: many ties in both maps, ranked by their average rank
        a = torch.randint(0, 4, (20, 5, 6), generator=g).float()
        b = torch.randint(0, 4, (20, 5, 6), generator=g).float()
        b[:5] = a[:5] + torch.randint(0, 2, (5, 5, 6), generator=g)  # correlated rows
    else:
        a = torch.randn(20, 5, 6, generator=g)
        b = a + torch.randn(20, 5, 6, generator=g) * torch.linspace(0.1, 3, 20).view(-1, 1, 1)
    got = map_similarity(a, b)
    want = [stats.spearmanr(u.flatten(), v.flatten()).statistic for u, v in zip(a, b)]
    assert got.shape == (20,)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert np.ptp(want) > 0.5  # the rows span a range of correlations, not one value
    np.testing.assert_allclose(map_similarity(a, -a).numpy(), -1.0, atol=1e-6)


def test_map_similarity_constant_maps_and_identity():
    g = torch.Generator().manual_seed(0)
    varying = torch.rand(3, 4, 4, generator=g)
    const = torch.full((3, 4, 4), 2.0)
    assert map_similarity(varying, varying).tolist() == [1.0] * 3
    assert map_similarity(const, const).tolist() == [1.0] * 3
    assert map_similarity(const, const * 5 - 1).tolist() == [1.0] * 3  # another constant: unchanged
    assert map_similarity(const, varying).tolist() == [0.0] * 3
    assert map_similarity(varying, const).tolist() == [0.0] * 3
    mixed = varying.clone()
    mixed[1] = 7.0  # only image 1 constant on one side
    assert map_similarity(varying, mixed)[1].item() == 0.0
    assert map_similarity(varying, mixed)[[0, 2]].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="one shape"):
        map_similarity(varying, varying[:2])


# ---- stages and copies -----------------------------------------------------------------------
def test_stages_of_a_vit_and_of_a_cnn(trained_like):
    assert randomisation_stages(trained_like) == ["head", "block 2", "block 1", "block 0", "embedding"]
    import timm

    from patchbench.models.adapter import ImageAdapter

    cnn = ImageAdapter(timm.create_model("resnet10t", num_classes=3), img_size=(32, 32))
    stages = randomisation_stages(cnn)
    assert stages == ["fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]
    before = _state(cnn)
    assert {k.split(".")[0] for k in _changed(before, _state(randomised_copy(cnn, 2)))} == {"fc", "layer4"}


def test_randomised_copy_stage_one_changes_only_the_head(trained_like):
    before = _state(trained_like)
    copy = randomised_copy(trained_like, 1, seed=0)
    assert type(copy) is type(trained_like) and copy.key == trained_like.key
    assert copy.model is not trained_like.model
    changed = _changed(before, _state(copy))
    # the classifier and the final norm, every parameter of them; blocks and embeddings bit-identical
    assert changed == {"head.weight", "head.bias", "norm.weight", "norm.bias"}


def test_randomised_copy_last_stage_changes_every_block(trained_like):
    before = _state(trained_like)
    copy = randomised_copy(trained_like, len(randomisation_stages(trained_like)), seed=0)
    changed = _changed(before, _state(copy))
    # every parameter of every block (LayerScale gamma and norms included), of the head and
    # of the embedding: nothing trained is left
    assert changed == set(before)
    assert {"patch_embed.proj.weight", "pos_embed", "cls_token"} <= changed
    # one stage less keeps the embedding
    no_embedding = _changed(before, _state(randomised_copy(trained_like, 4, seed=0)))
    assert {"patch_embed.proj.weight", "pos_embed", "cls_token"}.isdisjoint(no_embedding)
    # cumulative: stage 2 keeps stage 1's head draw and leaves blocks 0-1 alone
    one, two = _state(randomised_copy(trained_like, 1)), _state(randomised_copy(trained_like, 2))
    assert torch.equal(one["head.weight"], two["head.weight"])
    assert {k.split(".")[1] for k in _changed(before, two) if k.startswith("blocks.")} == {"2"}
    # re-drawn at a sensible scale, not zeros or copies of one value
    assert 0 < copy.model.blocks[0].mlp.fc1.weight.std() < 1


def test_randomised_copy_leaves_original_and_global_rng_alone_and_is_deterministic(trained_like):
    before = _state(trained_like)
    rng = torch.get_rng_state()
    a = _state(randomised_copy(trained_like, 4, seed=0))
    assert torch.equal(torch.get_rng_state(), rng)
    assert _changed(before, _state(trained_like)) == set()
    torch.manual_seed(123)  # another global state: no effect on the draws
    b = _state(randomised_copy(trained_like, 4, seed=0))
    c = _state(randomised_copy(trained_like, 4, seed=1))
    assert _changed(a, b) == set()
    assert {"head.weight", "blocks.0.attn.qkv.weight"} <= _changed(a, c)
    with pytest.raises(ValueError, match="stages must be in"):
        randomised_copy(trained_like, 6)


# ---- the check -------------------------------------------------------------------------------
def test_controls_do_not_change_with_the_model_and_fail(tiny):
    x, t = _inputs(tiny)
    frame = randomisation_check(tiny, {n: _factory(n) for n in ("random", "constant", "centre")}, x, t)
    assert list(frame.columns) == ["method", "stage", "stage_index", "spearman", "spearman_ci_low",
                                   "spearman_ci_high", "n", "threshold", "verdict"]
    assert len(frame) == 3 * 4 and frame.stage_index.tolist() == [1, 2, 3, 4] * 3
    assert frame.stage.tolist()[:4] == ["head", "block 1", "block 0", "embedding"]
    assert (frame.spearman == 1.0).all() and (frame.n == 12).all()
    assert (frame.spearman_ci_low == 1.0).all() and (frame.spearman_ci_high == 1.0).all()
    verdicts = sanity_verdicts(frame)
    assert verdicts.columns.tolist() == ["method", "final_spearman", "verdict"]
    assert verdicts.verdict.tolist() == ["fail"] * 3


def test_gradcam_decorrelates_between_independent_random_models(tiny):
    # the tiny ViT is itself a random draw: fully re-drawn blocks and head give an
    # independent model, whose Grad-CAM maps should be unrelated to the first one's
    x, t = _inputs(tiny, n=16)
    frame = randomisation_check(tiny, {"gradcam": _factory("gradcam")}, x, t)
    final = sanity_verdicts(frame).iloc[0]
    assert final.final_spearman < 0.3 and final.verdict == "pass"


def test_attention_of_a_trained_model_changes_with_its_blocks_not_its_head(glyphs_model):
    adapter, _ = glyphs_model
    from patchbench.datasets import create_dataset

    pixels, _labels, _masks = create_dataset("glyphs", "test", seed=0).tensors()
    x = adapter.prepare(pixels[:16])
    with torch.no_grad():
        t = adapter.logits(x).argmax(1)
    frame = randomisation_check(adapter, {"attention": _factory("attention")}, x, t)
    rho = frame.set_index("stage").spearman
    # last-layer attention never reads the classifier: randomising the head changes nothing
    assert rho["head"] == 1.0
    # with every block random the maps are unrelated to the trained ones (about -0.2 here)
    assert rho["block 0"] < 0.2 and rho["embedding"] < 0.2
    assert frame.spearman_ci_high.iloc[-1] < 0.5
    assert frame.verdict.iloc[0] == "pass"


class _Fails(Method):
    """Attention maps on the model it was made for; raises on any other (a randomised copy)."""

    name = "fails"
    needs_tokens = True
    original = None

    def _attribute(self, images, target):
        if self.adapter is not self.original:
            raise RuntimeError("cannot explain this model\nsecond line")
        return self.adapter.attention(images)[-1].mean(1)[:, 0, 1:].reshape(-1, *self.adapter.grid)


def test_a_failing_method_is_reported_not_fatal(tiny):
    x, t = _inputs(tiny)
    _Fails.original = tiny

    def create_fails(a):
        if a is not tiny:
            raise ValueError("no checkpoint for this model")
        return create_method("constant", a)

    def trained_fails(a):
        raise KeyError("missing")

    methods = {"attribute fails": _Fails, "create fails": create_fails,
               "trained fails": trained_fails, "constant": _factory("constant")}
    frame = randomisation_check(tiny, methods, x, t)
    verdicts = sanity_verdicts(frame).set_index("method").verdict
    assert verdicts["attribute fails"] == "error: head randomised: RuntimeError: cannot explain this model"
    assert verdicts["create fails"] == "error: head randomised: ValueError: no checkpoint for this model"
    assert verdicts["trained fails"] == "error: trained model: KeyError: 'missing'"
    assert verdicts["constant"] == "fail"
    failed = frame[frame.method != "constant"]
    assert failed.spearman.isna().all() and (failed.n == 0).all()
    assert (frame[frame.method == "constant"].spearman == 1.0).all()


class _Noise(Method):
    """Maps from the global random generator: nothing to do with the model."""

    name = "noise"

    def _attribute(self, images, target):
        return torch.rand(images.shape[0], *self.adapter.grid)


def test_result_does_not_depend_on_the_global_random_state(tiny):
    x, t = _inputs(tiny)
    methods = {"noise": _Noise, "gradcam": _factory("gradcam")}
    torch.manual_seed(1)
    first = randomisation_check(tiny, methods, x, t)
    torch.manual_seed(2)
    rng = torch.get_rng_state()
    second = randomisation_check(tiny, methods, x, t)
    assert torch.equal(torch.get_rng_state(), rng)  # the check draws from its own generator
    assert first.equals(second)
    # a method's own noise is the same for the trained and each randomised model, so noise
    # that ignores the model shows as unchanged (it would otherwise pass by chance)
    noise = first[first.method == "noise"]
    assert (noise.spearman == 1.0).all() and noise.verdict.iloc[0] == "fail"
    assert first[first.method == "gradcam"].spearman.iloc[-1] < 1


def test_diffmask_checkpoint_loads_on_randomised_copies(make_method, one_thread):
    adapter = ViTAdapter(tiny_vit(), key="tiny-keyed")
    path = make_method("diffmask", adapter).checkpoint
    x, t = _inputs(adapter, n=8)
    before = _state(adapter)
    frame = randomisation_check(adapter, {"diffmask": _factory("diffmask", checkpoint=path)}, x, t,
                                seed=5, threshold=0.25)
    assert not frame.verdict.iloc[0].startswith("error"), frame.verdict.iloc[0]
    assert frame.spearman.notna().all() and (frame.threshold == 0.25).all()
    assert all(math.isfinite(v) for v in frame.spearman)
    assert _changed(before, _state(adapter)) == set()
