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


# -- chefer, occlusion, rise, smoothgrad ---------------------------------------------------------


def lively(model, seed=0):
    """timm's init gives near-constant logits and tiny gradients: perturb the weights so the
    checks below compare maps that vary by image, patch and class."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


LIVELY = {
    "cls": lambda: ViTAdapter(lively(tiny_vit())),
    "registers": lambda: ViTAdapter(lively(tiny_vit(reg_tokens=2, img_size=(16, 24)))),
    "gap": lambda: ViTAdapter(lively(tiny_vit(class_token=False, global_pool="avg"))),
}


class PatchReader(torch.nn.Module):
    """Logits that read only the pixels of patch (row, col): [3s, -3s, 0], s their mean."""

    num_classes = 3

    def __init__(self, row, col, patch=4):
        super().__init__()
        self.rows = slice(row * patch, (row + 1) * patch)
        self.cols = slice(col * patch, (col + 1) * patch)
        self.unused = torch.nn.Parameter(torch.zeros(()))  # an adapter reads the device from one

    def forward(self, x):
        s = x[:, :, self.rows, self.cols].mean((1, 2, 3))
        return torch.stack([3 * s, -3 * s, torch.zeros_like(s)], 1) + 0 * self.unused


def reader_adapter(row=1, col=2):
    from patchbench.models.adapter import ImageAdapter

    return ImageAdapter(PatchReader(row, col), (0.5,) * 3, (0.5,) * 3, img_size=(16, 16), patch_size=4)


def slow_chefer(adapter, image, t):
    """Chefer et al. for one image: its own backward pass, explicit loops over blocks and heads."""
    with adapter.record_attention() as attns:
        logits = adapter.logits(image[None])
    grads = torch.autograd.grad(logits[0, t], attns)
    n = attns[0].shape[-1]
    relevance = torch.eye(n, dtype=torch.float64)
    for attn, grad in zip(attns, grads):
        a, g = attn[0].double(), grad[0].double()
        heads = a.shape[0]
        a_bar = sum(torch.relu(g[h] * a[h]) for h in range(heads)) / heads
        relevance = relevance + a_bar @ relevance
    npt = adapter.num_prefix_tokens
    row = relevance[0] if adapter.has_class_token else relevance[npt:].mean(0)
    return row[npt:].view(adapter.grid)


@pytest.mark.parametrize("model", list(LIVELY))
def test_chefer_matches_slow_reference_for_every_image(model, one_thread):
    adapter = LIVELY[model]()
    torch.manual_seed(3)
    images = torch.randn(3, 3, *adapter.img_size)
    target = torch.tensor([0, 4, 2])
    maps = create_method("chefer", adapter).attribute(images, target)
    for i in range(3):
        want = slow_chefer(adapter, images[i], int(target[i]))
        assert want.abs().max() > 1e-3  # not a vacuous comparison of zeros
        assert torch.allclose(maps[i].double(), want, atol=1e-6, rtol=1e-4), (maps[i] - want).abs().max()


def test_chefer_depends_on_the_class_and_rollout_does_not(one_thread):
    adapter = LIVELY["cls"]()
    images = torch.randn(2, 3, 16, 16)
    chefer = create_method("chefer", adapter)
    rollout = create_method("rollout", adapter)
    assert not torch.allclose(chefer.attribute(images, torch.tensor([0, 0])),
                              chefer.attribute(images, torch.tensor([1, 1])), atol=1e-4)
    assert torch.equal(rollout.attribute(images, torch.tensor([0, 0])),
                       rollout.attribute(images, torch.tensor([1, 1])))


def test_chefer_sees_gradients_where_attention_is_uniform(one_thread):
    """With q = k = 0 every attention row is exactly uniform: plain rollout cannot tell patches
    apart, while Chefer's ∇A ⊙ A still can, through the values the target logit needs."""
    model = lively(tiny_vit())
    d = model.embed_dim
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[:2 * d] = 0
            blk.attn.qkv.bias[:2 * d] = 0
    adapter = ViTAdapter(model)
    images = torch.randn(2, 3, 16, 16)
    n = adapter.num_patches + adapter.num_prefix_tokens
    assert all(torch.equal(a, torch.full_like(a, 1 / n)) for a in adapter.attention(images))
    rollout = create_method("rollout", adapter).attribute(images, torch.tensor([0, 1]))
    assert rollout.flatten(1).std(1).max() < 1e-6
    chefer = create_method("chefer", adapter).attribute(images, torch.tensor([0, 1]))
    assert (chefer.flatten(1).std(1) > 1e-4).all()


def test_chefer_is_zero_when_attention_cannot_change_the_logit(one_thread):
    """v = 0: every attention output is zero whatever the attention, so ∇A = 0 and R = I."""
    model = lively(tiny_vit())
    d = model.embed_dim
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[2 * d:] = 0
            blk.attn.qkv.bias[2 * d:] = 0
    adapter = ViTAdapter(model)
    images = torch.randn(2, 3, 16, 16)
    chefer = create_method("chefer", adapter).attribute(images, torch.tensor([0, 1]))
    assert torch.equal(chefer, torch.zeros_like(chefer))
    assert (create_method("rollout", adapter).attribute(images, torch.tensor([0, 1])) > 0).all()


def test_chefer_leaves_no_gradients_hooks_or_unfused_attention(one_thread):
    adapter = LIVELY["cls"]()
    attns = [blk.attn for blk in adapter.blocks]
    fused = [a.fused_attn for a in attns]
    method = create_method("chefer", adapter)
    method.attribute(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    handle = adapter.model.head.register_forward_hook(lambda *_: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        method.attribute(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    handle.remove()
    assert all(p.grad is None for p in adapter.model.parameters())
    assert not any(a.attn_drop._forward_hooks for a in attns)
    assert [a.fused_attn for a in attns] == fused


def occlude(image, row, col, patch, base):
    x = image.clone()
    x[:, row * patch[0]:(row + 1) * patch[0], col * patch[1]:(col + 1) * patch[1]] = \
        base[:, row * patch[0]:(row + 1) * patch[0], col * patch[1]:(col + 1) * patch[1]]
    return x


@pytest.mark.parametrize("baseline", ["zero", "black"])
def test_occlusion_matches_a_loop_over_patches(baseline, one_thread):
    adapter = LIVELY["registers"]()  # 16x24: a non-square grid catches a row/column mix-up
    torch.manual_seed(4)
    images = torch.randn(2, 3, 16, 24)
    target = torch.tensor([3, 1])
    # batch_size 5 does not divide 2·24: chunks straddle images
    maps = create_method("occlusion", adapter, baseline=baseline, batch_size=5).attribute(images, target)
    hp, wp = adapter.grid
    with torch.no_grad():
        for i in range(2):
            image, t = images[i], int(target[i])
            base = torch.zeros_like(image) if baseline == "zero" else adapter.normalize(
                torch.zeros_like(image[None]))[0]
            clean = adapter.logits(image[None]).softmax(-1)[0, t]
            for r in range(hp):
                for c in range(wp):
                    x = occlude(image, r, c, adapter.patch_size, base)
                    want = clean - adapter.logits(x[None]).softmax(-1)[0, t]
                    assert abs(float(maps[i, r, c]) - float(want)) < 1e-6, (i, r, c)
    assert maps.abs().max() > 1e-3


@pytest.mark.parametrize("baseline", ["zero", "black"])
def test_occlusion_credits_only_the_patch_the_model_reads(baseline):
    adapter = reader_adapter(row=1, col=2)
    images = torch.randn(2, 3, 16, 16)
    images[:, :, 4:8, 8:12] = 2.0  # the read patch: occluding it (to 0 or -1) lowers class 0
    maps = create_method("occlusion", adapter, baseline=baseline).attribute(images, torch.tensor([0, 0]))
    others = torch.ones(4, 4, dtype=torch.bool)
    others[1, 2] = False
    assert (maps[:, 1, 2] > 0.1).all()
    assert torch.equal(maps[:, others], torch.zeros(2, 15))


@pytest.mark.parametrize("n_masks,keep", [(24, 0.5), (3, 0.2)])
def test_rise_matches_a_loop_over_masks(n_masks, keep, one_thread):
    adapter = LIVELY["registers"]()
    torch.manual_seed(5)
    images = torch.randn(2, 3, 16, 24)
    target = torch.tensor([0, 2])
    method = create_method("rise", adapter, n_masks=n_masks, keep=keep, baseline="black", batch_size=7)
    maps = method.attribute(images, target)
    masks = method.masks
    assert masks.shape == (n_masks, *adapter.grid) and masks.dtype == torch.bool
    hp, wp = adapter.grid
    never = [(r, c) for r in range(hp) for c in range(wp) if not masks[:, r, c].any()]
    if keep == 0.2:
        assert never  # the fallback for a patch no mask keeps is exercised
    with torch.no_grad():
        for i in range(2):
            image, t = images[i], int(target[i])
            base = adapter.normalize(torch.zeros_like(image[None]))[0]
            probs = []
            for m in masks:
                x = image.clone()
                for r in range(hp):
                    for c in range(wp):
                        if not m[r, c]:
                            x = occlude(x, r, c, adapter.patch_size, base)
                probs.append(float(adapter.logits(x[None]).softmax(-1)[0, t]))
            for r in range(hp):
                for c in range(wp):
                    kept = [p for p, m in zip(probs, masks) if m[r, c]]
                    want = sum(kept) / len(kept) if kept else sum(probs) / len(probs)
                    assert abs(float(maps[i, r, c]) - want) < 1e-6, (i, r, c)


def test_rise_masks_come_from_the_seed():
    adapter = reader_adapter()
    a = create_method("rise", adapter, seed=1).masks
    assert torch.equal(a, create_method("rise", adapter, seed=1).masks)
    assert not torch.equal(a, create_method("rise", adapter, seed=2).masks)
    assert abs(a.float().mean() - 0.5) < 0.05  # keep = 0.5


def test_rise_ranks_the_patch_the_model_reads_first():
    from patchbench.metrics.functional import patch_ranking

    adapter = reader_adapter(row=3, col=0)
    images = torch.randn(3, 3, 16, 16)
    images[:, :, 12:16, 0:4] = 2.0
    maps = create_method("rise", adapter).attribute(images, torch.zeros(3, dtype=torch.long))
    assert (patch_ranking(maps)[:, 12] == 0).all()  # patch (3, 0), row-major index 12


@pytest.mark.parametrize("name,options,message", [
    ("rise", {"n_masks": 0}, "n_masks must be an integer >= 1, got 0"),
    ("rise", {"keep": 1.0}, r"keep must be in \(0, 1\), got 1.0"),
    ("rise", {"baseline": "grey"}, r"baseline must be one of \('zero', 'black'\), got 'grey'"),
    ("occlusion", {"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ("occlusion", {"baseline": "mean"}, "baseline must be one of"),
    ("smoothgrad", {"n_samples": 0}, "n_samples must be an integer >= 1, got 0"),
    ("smoothgrad", {"noise": -0.1}, "noise must be >= 0, got -0.1"),
    ("smoothgrad", {"batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
])
def test_new_methods_validate_options(tiny, name, options, message):
    with pytest.raises(ValueError, match=message):
        create_method(name, tiny, **options)


def plain_gradient_maps(adapter, images, target, times_input, absolute):
    """Input gradient of the target logit, image by image, pooled per patch with loops."""
    ph, pw = adapter.patch_size
    hp, wp = adapter.grid
    out = torch.zeros(len(images), hp, wp, dtype=torch.float64)
    for i, image in enumerate(images):
        x = image[None].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(adapter.logits(x)[0, int(target[i])], x)
        value = (grad * x.detach() if times_input else grad)[0].double().sum(0)
        if absolute:
            value = value.abs()
        for r in range(hp):
            for c in range(wp):
                out[i, r, c] = value[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw].sum()
    return out


@pytest.mark.parametrize("times_input", [False, True])
@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("n_samples", [1, 3])
def test_smoothgrad_without_noise_is_the_plain_gradient(times_input, absolute, n_samples, one_thread):
    adapter = LIVELY["registers"]()
    torch.manual_seed(6)
    images = torch.randn(2, 3, 16, 24)
    target = torch.tensor([1, 3])
    maps = create_method("smoothgrad", adapter, n_samples=n_samples, noise=0.0, times_input=times_input,
                         absolute=absolute, batch_size=2).attribute(images, target)
    want = plain_gradient_maps(adapter, images, target, times_input, absolute)
    assert want.abs().max() > 1e-3
    assert torch.allclose(maps.double(), want, atol=1e-6, rtol=1e-4), (maps - want).abs().max()


def test_smoothgrad_averages_the_gradient_of_a_linear_model():
    """A linear logit has the same gradient at every noisy copy: the mean is that gradient."""
    from patchbench.models.adapter import ImageAdapter

    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    model.num_classes = 2
    adapter = ImageAdapter(model, (0.5,) * 3, (0.5,) * 3, img_size=(16, 16), patch_size=4)
    images = torch.randn(2, 3, 16, 16)
    maps = create_method("smoothgrad", adapter, n_samples=5, noise=0.5, absolute=False,
                         batch_size=3).attribute(images, torch.tensor([0, 1]))
    w = model[1].weight.detach().view(2, 3, 16, 16).sum(1)
    want = w.view(2, 4, 4, 4, 4).sum((2, 4))
    assert torch.allclose(maps, want, atol=1e-5)


def test_smoothgrad_noise_is_seeded_by_image_content(one_thread):
    adapter = LIVELY["cls"]()
    torch.manual_seed(8)
    images = torch.randn(3, 3, 16, 16)
    images[2] = images[0]  # the same image twice: the same noise, wherever it sits
    target = torch.tensor([1, 2, 1])
    maps = create_method("smoothgrad", adapter, n_samples=4).attribute(images, target)
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(maps, create_method("smoothgrad", adapter, n_samples=4).attribute(images, target))
    assert torch.equal(maps[0], maps[2])
    chunked = create_method("smoothgrad", adapter, n_samples=4, batch_size=3).attribute(images, target)
    assert torch.allclose(maps, chunked, atol=1e-6, rtol=1e-5)
    other_seed = create_method("smoothgrad", adapter, n_samples=4, seed=1).attribute(images, target)
    assert not torch.allclose(maps, other_seed, atol=1e-4)
    no_noise = create_method("smoothgrad", adapter, n_samples=4, noise=0.0).attribute(images, target)
    assert not torch.allclose(maps, no_noise, atol=1e-4)


def test_smoothgrad_draws_different_noise_for_different_images():
    """Linear logit, gradient × input, one copy: map − (w ⊙ x pooled) is σ·(w ⊙ noise) pooled.
    Two images one shift apart have the same σ; with noise seeded from the seed alone (not the
    content) those residuals would be equal."""
    from patchbench.models.adapter import ImageAdapter

    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    model.num_classes = 2
    adapter = ImageAdapter(model, (0.5,) * 3, (0.5,) * 3, img_size=(16, 16), patch_size=4)
    image = torch.randn(3, 16, 16)
    images = torch.stack([image, image + 1])
    maps = create_method("smoothgrad", adapter, n_samples=1, noise=0.2, absolute=False,
                         times_input=True).attribute(images, torch.tensor([0, 0]))
    w = model[1].weight.detach()[0].view(3, 16, 16)
    residual = maps - (w * images).sum(1).view(2, 4, 4, 4, 4).sum((2, 4))
    assert residual.abs().min() > 0
    assert not torch.allclose(residual[0], residual[1], atol=1e-4)
