"""Every registered method: contract, batch independence; per-method correctness checks."""

import pytest
import torch
from conftest import tiny_vit

from patchbench.methods import METHODS, Method, MethodOutputError, create_method, list_methods
from patchbench.models import ViTAdapter

ADAPTERS = {
    "cls": lambda: ViTAdapter(tiny_vit()),
    "registers": lambda: ViTAdapter(tiny_vit(reg_tokens=2, img_size=(16, 24))),
}


@pytest.fixture(scope="module", params=list(ADAPTERS))
def adapter(request):
    return ADAPTERS[request.param]()


@pytest.mark.parametrize("name", list_methods())
def test_batch_result_equals_one_at_a_time(adapter, name, make_method):
    torch.manual_seed(0)
    images = torch.randn(4, 3, *adapter.img_size)
    target = torch.tensor([0, 3, 1, 4])
    method = make_method(name, adapter)
    batch = method.attribute(images, target)
    assert batch.shape == (4, *adapter.grid) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all()
    alone = torch.cat([method.attribute(images[i:i + 1], target[i:i + 1]) for i in range(4)])
    assert torch.allclose(batch, alone, atol=1e-5, rtol=1e-4), (batch - alone).abs().max()
    reordered = method.attribute(images.flip(0), target.flip(0)).flip(0)
    assert torch.allclose(batch, reordered, atol=1e-5, rtol=1e-4)
    # not a constant map: every method must discriminate between patches on some image,
    # except the control whose point is to be constant
    if name != "constant":
        assert batch.flatten(1).std(1).max() > 0


def test_random_is_seeded_per_image(tiny):
    images = torch.randn(3, 3, 16, 16)
    t = torch.zeros(3, dtype=torch.long)
    a = create_method("random", tiny, seed=1).attribute(images, t)
    assert torch.equal(a, create_method("random", tiny, seed=1).attribute(images, t))
    assert not torch.equal(a, create_method("random", tiny, seed=2).attribute(images, t))
    assert not torch.equal(a[0], a[1])


def slow_rollout(attns, discard_ratio, npt):
    """Rollout for one image with plain loops over layers (attns: list of [heads, N, N])."""
    n = attns[0].shape[-1]
    result = torch.eye(n, dtype=torch.float64)
    for attn in attns:
        a = attn.double().mean(0)
        flat = a.flatten().clone()
        k = int(n * n * discard_ratio)
        lowest = sorted(range(n * n), key=lambda i: flat[i].item())[:k]
        for i in lowest:
            if i != 0:
                flat[i] = 0
        a = flat.view(n, n)
        a = (a + torch.eye(n, dtype=torch.float64)) / 2
        a = a / a.sum(-1, keepdim=True)
        result = a @ result
    return result[0, npt:]


@pytest.mark.parametrize("discard", [0.0, 0.5])
def test_rollout_matches_slow_reference_for_every_image(tiny, discard):
    torch.manual_seed(2)
    images = torch.randn(3, 3, 16, 16)
    maps = create_method("rollout", tiny, discard_ratio=discard).attribute(images, torch.zeros(3).long())
    attns = tiny.attention(images)
    for i in range(3):
        want = slow_rollout([a[i] for a in attns], discard, tiny.num_prefix_tokens)
        assert torch.allclose(maps[i].flatten().double(), want, atol=1e-5)


def test_attention_is_last_layer_class_token_row(tiny):
    images = torch.randn(2, 3, 16, 16)
    maps = create_method("attention", tiny).attribute(images, torch.zeros(2).long())
    last = tiny.attention(images)[-1].mean(1)[:, 0, tiny.num_prefix_tokens:]
    assert torch.allclose(maps.flatten(1), last)


def test_gradcam_refuses_a_layer_without_gradient(tiny):
    # patch tokens at the last block's output never reach a class-token head
    method = create_method("gradcam", tiny, layer="blocks.1")
    with pytest.raises(RuntimeError, match="gradients .* are all zero"):
        method.attribute(torch.randn(2, 3, 16, 16), torch.zeros(2).long())
    module = tiny.model.get_submodule("blocks.1")
    assert not module._forward_hooks and not module._backward_hooks


def test_gradcam_hooks_released_after_exception(tiny, monkeypatch):
    import pytorch_grad_cam

    def boom(*a, **k):
        raise IndexError("boom")  # pytorch-grad-cam's own __exit__ would swallow this one

    monkeypatch.setattr(pytorch_grad_cam.GradCAM, "get_cam_weights", boom)
    method = create_method("gradcam", tiny)
    with pytest.raises(IndexError, match="boom"):
        method.attribute(torch.randn(2, 3, 16, 16), torch.zeros(2).long())
    assert not method.module._forward_hooks
    assert all(p.grad is None for p in tiny.model.parameters())


def test_ig_completeness(tiny):
    """Integrated gradients: patch sums add up to f(x) - f(baseline) (up to the quadrature)."""
    images = torch.randn(2, 3, 16, 16)
    target = torch.tensor([1, 2])
    maps = create_method("integrated_gradients", tiny, n_steps=64).attribute(images, target)
    with torch.no_grad():
        delta = tiny.logits(images)[[0, 1], target] - tiny.logits(torch.zeros_like(images))[[0, 1], target]
    assert torch.allclose(maps.flatten(1).sum(1), delta, atol=0.02 * delta.abs().max() + 1e-3)


class _Bad(Method):
    name = "bad"

    def __init__(self, adapter, kind="shape"):
        super().__init__(adapter)
        self.kind = kind

    def _attribute(self, images, target):
        maps = torch.rand(images.shape[0], *self.adapter.grid)
        if self.kind == "shape":
            return maps[:, :-1]
        if self.kind == "nan":
            maps[0, 0, 0] = float("nan")
        if self.kind == "inf":
            maps[-1, 1, 1] = float("inf")
        if self.kind == "numpy":
            return maps.numpy()
        return maps


@pytest.fixture
def bad_method():
    METHODS.register("bad")(_Bad)
    yield
    METHODS._entries.pop("bad")


@pytest.mark.parametrize("kind,message", [
    ("shape", r"method 'bad' returned maps of shape \[2, 3, 4\], expected \[2, 4, 4\]"),
    ("nan", r"method 'bad' returned 1 NaN and 0 infinite values \(images \[0\]"),
    ("inf", r"method 'bad' returned 0 NaN and 1 infinite values \(images \[1\]"),
    ("numpy", r"method 'bad' returned ndarray, expected a tensor"),
])
def test_bad_outputs_are_reported_with_the_method_name(tiny, bad_method, kind, message):
    with pytest.raises(MethodOutputError, match=message):
        create_method("bad", tiny, kind=kind).attribute(torch.randn(2, 3, 16, 16), torch.zeros(2).long())


def test_bad_inputs_are_refused(tiny):
    method = create_method("attention", tiny)
    with pytest.raises(ValueError, match=r"expected images \[B, C, 16, 16\]"):
        method.attribute(torch.randn(2, 3, 8, 8), torch.zeros(2).long())
    with pytest.raises(ValueError, match=r"expected target \[2\]"):
        method.attribute(torch.randn(2, 3, 16, 16), torch.zeros(3).long())


def test_config_records_options(tiny):
    assert create_method("rollout", tiny, discard_ratio=0.9).config() == {
        "name": "rollout", "head_fusion": "mean", "discard_ratio": 0.9}


def test_centre_prior_ranks_the_middle_first(tiny):
    from patchbench.metrics.functional import patch_ranking

    maps = create_method("centre", tiny).attribute(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    rank = patch_ranking(maps)[0].view(4, 4)
    assert set(rank[1:3, 1:3].flatten().tolist()) == {0, 1, 2, 3}  # the four central patches first
    assert set(rank[[0, 0, 3, 3], [0, 3, 0, 3]].tolist()) == {12, 13, 14, 15}  # corners last
    assert torch.equal(maps[0], maps[1])


def test_constant_control_is_a_raster_scan(tiny):
    from patchbench.metrics.functional import patch_ranking

    maps = create_method("constant", tiny).attribute(torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2]))
    assert torch.equal(patch_ranking(maps), torch.arange(16).expand(3, 16))
