"""ViTAdapter on tiny, randomly initialised timm vision transformers (no downloads)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from patchbench.models import NotAViTError, ViTAdapter

EMBED_DIM = 32
DEPTH = 2
HEADS = 2
NUM_CLASSES = 5
ATOL = 1e-5


@dataclass
class Case:
    name: str
    cls: type
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    num_prefix_tokens: int
    kwargs: dict = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])


CASES = [
    Case("plain", VisionTransformer, (16, 16), (4, 4), 1),
    Case("registers", VisionTransformer, (16, 16), (4, 4), 5, {"reg_tokens": 4}),
    Case("registers_no_embed_class", VisionTransformer, (16, 16), (4, 4), 5,
         {"reg_tokens": 4, "no_embed_class": True}),
    Case("deit_distilled", VisionTransformerDistilled, (16, 16), (4, 4), 2),
    Case("non_square_grid", VisionTransformer, (16, 24), (4, 4), 1),
    Case("non_square_patch", VisionTransformer, (16, 24), (2, 4), 1),
    Case("avg_pool_no_class_token", VisionTransformer, (16, 16), (4, 4), 0,
         {"class_token": False, "global_pool": "avg"}),
    Case("pre_norm", VisionTransformer, (16, 16), (4, 4), 1, {"pre_norm": True}),
    Case("dynamic_img_size", VisionTransformer, (16, 16), (4, 4), 1, {"dynamic_img_size": True}),
]


def build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    model = case.cls(img_size=case.img_size, patch_size=case.patch_size, embed_dim=EMBED_DIM,
                     depth=DEPTH, num_heads=HEADS, num_classes=NUM_CLASSES, **case.kwargs)
    # timm's init (std 0.02, zero head bias) gives near-constant logits; perturb every weight so
    # that the outputs depend clearly on which tokens are present and where they are
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def make_images(case: Case, batch: int = 4, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, 3, *case.img_size)


def random_keep(batch: int, num_patches: int, counts: list[int], seed: int = 2) -> torch.Tensor:
    torch.manual_seed(seed)
    keep = torch.zeros(batch, num_patches, dtype=torch.bool)
    for i, c in enumerate(counts):
        keep[i, torch.randperm(num_patches)[:c]] = True
    return keep


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request) -> Case:
    return request.param


@pytest.fixture
def vit(case) -> nn.Module:
    return build(case)


@pytest.fixture
def adapter(vit) -> ViTAdapter:
    return ViTAdapter(vit)


pytestmark = pytest.mark.usefixtures("no_grad", "one_thread")


# ---- geometry ---------------------------------------------------------------------------------
def test_geometry_matches_model_and_config(case, vit, adapter):
    assert adapter.grid == tuple(vit.patch_embed.grid_size) == case.grid
    assert adapter.num_patches == vit.patch_embed.num_patches == case.grid[0] * case.grid[1]
    assert adapter.patch_size == tuple(vit.patch_embed.patch_size) == case.patch_size
    assert adapter.num_prefix_tokens == vit.num_prefix_tokens == case.num_prefix_tokens
    assert adapter.img_size == case.img_size
    assert adapter.depth == DEPTH
    assert adapter.num_classes == NUM_CLASSES
    assert adapter.has_class_token == case.kwargs.get("class_token", True)
    assert all(isinstance(v, int) for v in (*adapter.grid, *adapter.patch_size, *adapter.img_size))


def test_constructor_puts_model_in_eval_mode(case):
    model = build(case).train()
    ViTAdapter(model)
    assert not any(m.training for m in model.modules())


# ---- forward passes ---------------------------------------------------------------------------
def test_forward_embeddings_reproduces_model(case, vit, adapter):
    x = make_images(case)
    h0 = adapter.patch_embeddings(x)
    assert h0.shape == (x.shape[0], adapter.num_patches, EMBED_DIM)
    expected = vit(x)
    close(adapter.forward_embeddings(h0), expected)
    close(adapter.logits(x), expected)


def test_forward_embeddings_uses_the_given_embeddings(case, vit, adapter):
    x = make_images(case)
    h0 = adapter.patch_embeddings(x)
    edited = h0 * torch.linspace(0, 2, h0.shape[1]).view(1, -1, 1)
    # reference: the model itself with its patch embedding output replaced
    handle = vit.patch_embed.register_forward_hook(lambda _m, _i, out: edited.reshape(out.shape))
    try:
        expected = vit(x)
    finally:
        handle.remove()
    assert (expected - vit(x)).abs().max() > 1e-3  # the edit matters
    close(adapter.forward_embeddings(edited), expected)


def test_hidden_states(case, vit, adapter):
    x = make_images(case)
    block_inputs: list[torch.Tensor] = []
    block_outputs: list[torch.Tensor] = []
    handles = [blk.register_forward_pre_hook(lambda _m, args: block_inputs.append(args[0]))
               for blk in vit.blocks]
    handles.append(vit.blocks[-1].register_forward_hook(lambda _m, _i, o: block_outputs.append(o)))
    try:
        vit(x)
    finally:
        for h in handles:
            h.remove()
    assert len(block_inputs) == DEPTH and len(block_outputs) == 1

    states = adapter.hidden_states(x)
    assert len(states) == DEPTH + 2
    num_tokens = case.num_prefix_tokens + adapter.num_patches
    assert states[0].shape == (x.shape[0], adapter.num_patches, EMBED_DIM)
    for s in states[1:]:
        assert s.shape == (x.shape[0], num_tokens, EMBED_DIM)
    close(states[0], adapter.patch_embeddings(x))
    for i in range(DEPTH):
        close(states[i + 1], block_inputs[i])
    close(states[-2], block_inputs[-1])
    close(states[-1], block_outputs[0])


# ---- attention --------------------------------------------------------------------------------
def manual_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    attn = block.attn
    b, n, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


def test_attention_shapes_values_and_flags(case, vit, adapter):
    x = make_images(case)
    for blk in vit.blocks:
        blk.attn.fused_attn = True
    block_inputs: list[torch.Tensor] = []
    handles = [blk.register_forward_pre_hook(lambda _m, args: block_inputs.append(args[0]))
               for blk in vit.blocks]
    try:
        vit(x)
    finally:
        for h in handles:
            h.remove()

    attns = adapter.attention(x)
    n = case.num_prefix_tokens + adapter.num_patches
    assert len(attns) == DEPTH
    for blk, inp, a in zip(vit.blocks, block_inputs, attns):
        assert a.shape == (x.shape[0], HEADS, n, n)
        assert (a >= 0).all()
        close(a.sum(-1), torch.ones(x.shape[0], HEADS, n))
        close(a, manual_attention(blk, inp))
    assert all(blk.attn.fused_attn is True for blk in vit.blocks)
    assert all(not blk.attn.attn_drop._forward_hooks for blk in vit.blocks)


def test_attention_restores_mixed_fused_flags(case, vit, adapter):
    flags = [i % 2 == 0 for i in range(DEPTH)]
    for blk, f in zip(vit.blocks, flags):
        blk.attn.fused_attn = f
    assert len(adapter.attention(make_images(case))) == DEPTH
    assert [blk.attn.fused_attn for blk in vit.blocks] == flags


def test_record_attention_cleans_up_on_exception(case, vit, adapter):
    x = make_images(case)
    for blk in vit.blocks:
        blk.attn.fused_attn = True
    with pytest.raises(RuntimeError, match="boom"), adapter.record_attention() as records:
        assert all(len(blk.attn.attn_drop._forward_hooks) == 1 for blk in vit.blocks)
        assert not any(blk.attn.fused_attn for blk in vit.blocks)
        adapter.logits(x)
        assert len(records) == DEPTH
        raise RuntimeError("boom")
    assert all(not blk.attn.attn_drop._forward_hooks for blk in vit.blocks)
    assert all(blk.attn.fused_attn is True for blk in vit.blocks)
    adapter.logits(x)
    assert len(records) == DEPTH  # nothing is recorded any more


def test_record_attention_rejects_foreign_attention(case, vit, adapter):
    class OtherAttention(nn.Module):
        def forward(self, x, **_kw):
            return x

    vit.blocks[-1].attn = OtherAttention()
    with pytest.raises(NotAViTError, match="attention"):
        adapter.attention(make_images(case))
    assert all(not blk.attn.attn_drop._forward_hooks for blk in vit.blocks[:-1])


# ---- forward_kept -----------------------------------------------------------------------------
def reference_kept(vit: nn.Module, image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Slow, one image: the model's own steps with the removed patch tokens taken out."""
    x = vit._pos_embed(vit.patch_embed(image[None]))
    npt = vit.num_prefix_tokens
    kept = keep.nonzero().squeeze(1)  # ascending: original order
    x = torch.cat([x[:, :npt], x[:, npt + kept]], dim=1)
    x = vit.norm_pre(x)
    for blk in vit.blocks:
        x = blk(x)
    return vit.forward_head(vit.norm(x))[0]


def test_forward_kept_all_kept_equals_model(case, vit, adapter):
    x = make_images(case)
    keep = torch.ones(x.shape[0], adapter.num_patches, dtype=torch.bool)
    close(adapter.forward_kept(x, keep), vit(x))


def test_forward_kept_subset_matches_reference(case, vit, adapter):
    p = adapter.num_patches
    counts = [p // 2, 1, p // 2, p - 1, 3, p]  # mixed counts; two rows share a count
    x = make_images(case, batch=len(counts))
    keep = random_keep(len(counts), p, counts)
    assert not torch.equal(keep[0], keep[2])
    out = adapter.forward_kept(x, keep)
    assert out.shape == (len(counts), NUM_CLASSES)
    expected = torch.stack([reference_kept(vit, x[i], keep[i]) for i in range(len(counts))])
    close(out, expected)
    assert (out[:-1] - vit(x)[:-1]).abs().amax(1).min() > 1e-3  # removal matters


def test_forward_kept_nothing_kept(case, vit, adapter):
    x = make_images(case, batch=2)
    keep = torch.zeros(2, adapter.num_patches, dtype=torch.bool)
    keep[1, 3] = True
    if case.num_prefix_tokens == 0 or vit.global_pool not in ("token", ""):
        with pytest.raises(ValueError, match="cannot remove every patch"):
            adapter.forward_kept(x, keep)
    else:
        expected = torch.stack([reference_kept(vit, x[i], keep[i]) for i in range(2)])
        close(adapter.forward_kept(x, keep), expected)


def test_forward_kept_nothing_kept_refused_when_head_pools_patches():
    # register tokens but average pooling over patches: an empty sequence would pool to NaN
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                            num_classes=5, class_token=False, reg_tokens=4, global_pool="avg").eval()
    adapter = ViTAdapter(vit)
    with pytest.raises(ValueError, match="cannot remove every patch"):
        adapter.forward_kept(torch.randn(1, 3, 16, 16), torch.zeros(1, 16, dtype=torch.bool))
    keep = torch.zeros(1, 16, dtype=torch.bool)
    keep[0, 5] = True
    assert torch.isfinite(adapter.forward_kept(torch.randn(1, 3, 16, 16), keep)).all()


def test_forward_kept_rows_independent_of_batch(case, adapter):
    p = adapter.num_patches
    counts = [p // 2, 2, p // 2, p - 3]
    x = make_images(case, batch=len(counts))
    keep = random_keep(len(counts), p, counts)
    full = adapter.forward_kept(x, keep)
    for i in range(len(counts)):
        close(adapter.forward_kept(x[i:i + 1], keep[i:i + 1])[0], full[i])
    perm = torch.tensor([2, 0, 3, 1])
    close(adapter.forward_kept(x[perm], keep[perm]), full[perm])
    others_all_kept = keep.clone()
    others_all_kept[1:] = True
    close(adapter.forward_kept(x, others_all_kept)[0], full[0])


# ---- pixels <-> patches -----------------------------------------------------------------------
def test_patch_pixel_round_trip(case, adapter):
    torch.manual_seed(3)
    b = 5
    (hp, wp), (ph, pw) = adapter.grid, adapter.patch_size
    mask = torch.rand(b, adapter.num_patches) < 0.5
    grid = mask.view(b, hp, wp)
    pixels = adapter.patch_to_pixel(mask)
    assert pixels.shape == (b, 1, *case.img_size)
    rows = torch.arange(case.img_size[0]) // ph
    cols = torch.arange(case.img_size[1]) // pw
    assert torch.equal(pixels[:, 0].bool(), grid[:, rows][:, :, cols])
    assert torch.equal(adapter.patch_to_pixel(grid), pixels)
    back = adapter.pixel_to_patch(pixels[:, 0])
    assert back.shape == (b, hp, wp) and back.dtype == torch.bool
    assert torch.equal(back, grid)

    values = torch.randn(b, adapter.num_patches)
    assert torch.equal(adapter.patch_to_pixel(values)[:, 0], values.view(b, hp, wp)[:, rows][:, :, cols])


def test_pixel_to_patch_marks_patch_with_any_pixel(case, adapter):
    (hp, wp), (ph, pw) = adapter.grid, adapter.patch_size
    pix = torch.zeros(1, *case.img_size, dtype=torch.bool)
    r, c = case.img_size[0] - 1, ph + pw - 1  # bottom row, a column inside some patch
    pix[0, r, c] = True
    expected = torch.zeros(1, hp, wp, dtype=torch.bool)
    expected[0, r // ph, c // pw] = True
    assert torch.equal(adapter.pixel_to_patch(pix), expected)


# ---- not a ViT --------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: nn.Linear(4, 2),
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    lambda: timm.create_model("resnet10t", pretrained=False, num_classes=3),
], ids=["linear", "conv", "timm_resnet"])
def test_non_vit_raises(make):
    model = make()
    with pytest.raises(NotAViTError) as e:
        ViTAdapter(model)
    msg = str(e.value)
    assert type(model).__name__ in msg
    assert "not a timm VisionTransformer" in msg and "patch_embed" in msg
    assert isinstance(e.value, ValueError)
