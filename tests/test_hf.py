"""Hugging Face ViTs (``hf:<folder>``): loading, same maps as in memory, the same primitives as an
equivalent timm ViT, attention recording, DiffMask and a bench run (offline, tiny random models)."""

import functools

import pandas as pd
import pytest
import torch
from test_files import write_cifar
from timm.models.vision_transformer import VisionTransformer

from patchbench.bench import BenchConfig, run_benchmark
from patchbench.methods import create_method
from patchbench.methods.diffmask import CheckpointMismatchError
from patchbench.methods.diffmask_train import DiffMaskConfig, save_explainer, train_diffmask
from patchbench.metrics.faithfulness import faithfulness_curves, prepare_reference
from patchbench.models import ViTAdapter, create_operator
from patchbench.models.hf import HFViTAdapter
from patchbench.models.hub import create_model

transformers = pytest.importorskip("transformers")

HALF = (0.5, 0.5, 0.5)
METHODS = ("random", "attention", "rollout", "gradcam", "integrated_gradients")


def hf_vit(seed: int):
    """A tiny ViTForImageClassification (32x32 images, 8x8 patches, grid 4x4, 2 layers, 5 classes)
    with seeded weights, perturbed so its logits are far from constant."""
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128, num_labels=5)
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(cfg).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(in-memory model, its save_pretrained folder, a folder with other weights)."""
    model = hf_vit(0)
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "vit")
    hf_vit(1).save_pretrained(root / "other")
    return model, root / "vit", root / "other"


@pytest.fixture(scope="module")
def loaded(hf):
    _, folder, _ = hf
    adapter, meta = create_model(f"hf:{folder}")
    return adapter, meta


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 32, 32, generator=g) - 0.5) / 0.5


def test_loads_a_save_pretrained_folder_with_its_geometry_and_a_weight_key(hf, loaded, one_thread):
    model, folder, other = hf
    adapter, meta = loaded
    assert isinstance(adapter, HFViTAdapter) and adapter.is_vit
    assert adapter.grid == (4, 4) and adapter.patch_size == (8, 8) and adapter.img_size == (32, 32)
    assert adapter.num_prefix_tokens == 1 and adapter.depth == 2 and adapter.embed_dim == 64
    assert adapter.num_classes == 5 and adapter.mean == HALF and adapter.std == HALF
    assert meta["key"] == adapter.key and adapter.key.startswith("hf-")
    assert meta["data_config"]["input_size"] == (3, 32, 32)
    assert create_model(f"hf:{folder}")[0].key == adapter.key  # same weights, same key
    assert create_model(f"hf:{other}")[0].key != adapter.key  # other weights, other key
    x = images()
    with torch.no_grad():
        ref = model(pixel_values=x).logits
        out = adapter.logits(x)
        # the adapter's own token path gives the model's logits
        tokens = adapter.forward_embeddings(adapter.patch_embeddings(x))
    assert ref.std(0).mean() > 0.1  # logits depend on the image
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(tokens, ref, rtol=0, atol=1e-5)


def test_loaded_adapter_gives_the_in_memory_models_maps_and_scores(hf, loaded, one_thread):
    model, _, _ = hf
    adapter, _ = loaded
    memory = HFViTAdapter(model, HALF, HALF)
    x = images()
    with torch.no_grad():
        t = adapter.logits(x).argmax(1)
    for name in METHODS:
        opts = {"n_steps": 4} if name == "integrated_gradients" else {}
        a = create_method(name, adapter, **opts).attribute(x, t)
        b = create_method(name, memory, **opts).attribute(x, t)
        assert a.shape == (4, 4, 4), name
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    maps = create_method("rollout", adapter).attribute(x, t)
    seeds = torch.arange(len(x))
    for op_name in ("mean", "drop"):
        scores = []
        for ad in (adapter, memory):
            op = create_operator(op_name)
            ref = prepare_reference(ad, op, x, seeds)
            scores.append(faithfulness_curves(ad, op, x, t, maps, ref, steps=4).scores())
        assert scores[0].keys() == scores[1].keys()
        for k in scores[0]:
            assert torch.isfinite(scores[0][k]).all()
            torch.testing.assert_close(scores[0][k], scores[1][k], rtol=0, atol=1e-6, msg=f"{op_name} {k}")


def timm_twin(model) -> VisionTransformer:
    """The timm VisionTransformer computing what ``model`` (HF) computes, with its weights."""
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                            num_classes=5, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-12),
                            qkv_bias=True).eval()
    src = model.state_dict()
    state = {"cls_token": src["vit.embeddings.cls_token"],
             "pos_embed": src["vit.embeddings.position_embeddings"],
             "norm.weight": src["vit.layernorm.weight"], "norm.bias": src["vit.layernorm.bias"],
             "head.weight": src["classifier.weight"], "head.bias": src["classifier.bias"]}
    for p in ("weight", "bias"):
        state[f"patch_embed.proj.{p}"] = src[f"vit.embeddings.patch_embeddings.projection.{p}"]
        for i in range(2):
            hf_l, tm = f"vit.layers.{i}", f"blocks.{i}"
            state[f"{tm}.attn.qkv.{p}"] = torch.cat(
                [src[f"{hf_l}.attention.{q}_proj.{p}"] for q in ("q", "k", "v")])
            for a, b in (("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"),
                         ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
                state[f"{tm}.{b}.{p}"] = src[f"{hf_l}.{a}.{p}"]
    vit.load_state_dict(state)  # strict: every timm weight is set
    return vit


def test_hf_primitives_match_an_equivalent_timm_vit(hf, loaded, one_thread):
    model, _, _ = hf
    adapter, _ = loaded
    twin = ViTAdapter(timm_twin(model), mean=HALF, std=HALF)
    assert (twin.grid, twin.num_prefix_tokens, twin.depth, twin.embed_dim) == (
        adapter.grid, adapter.num_prefix_tokens, adapter.depth, adapter.embed_dim)
    x = images(5)
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(5, 16, generator=g) < torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0]).view(-1, 1)
    keep[2, :3] = True  # row 2 keeps at least its first patches; row 0 keeps none, row 4 all
    assert len(keep.sum(1).unique()) >= 4  # rows keep different numbers of patches
    with torch.no_grad():
        ref = adapter.logits(x)
        torch.testing.assert_close(twin.logits(x), ref, rtol=0, atol=1e-4)
        hs, ht = adapter.hidden_states(x), twin.hidden_states(x)
        assert len(hs) == len(ht) == 4
        for i, (a, b) in enumerate(zip(hs, ht)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=f"hidden state {i}")
        kept = adapter.forward_kept(x, keep)
        torch.testing.assert_close(kept, twin.forward_kept(x, keep), rtol=0, atol=1e-4)
        assert not torch.allclose(kept, ref, atol=1e-3)  # dropping tokens changes the logits
        torch.testing.assert_close(kept[4], ref[4], rtol=0, atol=1e-5)  # keeping all changes nothing
        aa, at = adapter.attention(x), twin.attention(x)
    assert len(aa) == len(at) == 2
    for i, (a, b) in enumerate(zip(aa, at)):
        assert a.shape == (5, 4, 17, 17)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"attention of layer {i}")
    t = ref.argmax(1)
    for name in ("attention", "rollout"):
        torch.testing.assert_close(create_method(name, adapter).attribute(x, t),
                                   create_method(name, twin).attribute(x, t), rtol=0, atol=1e-5, msg=name)


def test_attention_recording_restores_the_implementation_and_removes_hooks(hf, one_thread):
    model, _, _ = hf
    adapter = HFViTAdapter(model, HALF, HALF)
    before = model.config._attn_implementation
    assert before != "eager"  # sdpa: the probabilities are only there while recording
    attns = [blk.attention for blk in adapter.blocks]
    x = images(2)
    with torch.no_grad():
        logits = adapter.logits(x)
        attn = adapter.attention(x)
    assert len(attn) == 2 and all(a.shape == (2, 4, 17, 17) for a in attn)
    torch.testing.assert_close(attn[0].sum(-1), torch.ones(2, 4, 17))
    assert model.config._attn_implementation == before
    assert all(not m._forward_hooks for m in attns)
    with pytest.raises(RuntimeError, match="inside"), adapter.record_attention() as records:
        assert model.config._attn_implementation == "eager"
        with torch.no_grad():
            adapter.logits(x)
        assert len(records) == 2
        raise RuntimeError("inside")
    assert model.config._attn_implementation == before
    assert all(not m._forward_hooks for m in attns)
    with torch.no_grad():
        torch.testing.assert_close(adapter.logits(x), logits, rtol=0, atol=1e-6)


def test_diffmask_trains_and_explains_on_a_hf_model(hf, loaded, tmp_path, one_thread):
    _, _, other = hf
    adapter, _ = loaded
    cfg = DiffMaskConfig(steps=5, batch_size=8)
    explainer, log = train_diffmask(adapter, images(16, seed=1), cfg, progress=False)
    assert len(log) == 5 and all(torch.isfinite(torch.tensor(r["kl"])) for r in log)
    path = tmp_path / "explainer.pt"
    save_explainer(path, explainer, adapter, "random", cfg, {})
    x = images(3)
    maps = create_method("diffmask", adapter, checkpoint=path).attribute(x, torch.tensor([0, 1, 2]))
    assert maps.shape == (3, 4, 4) and torch.isfinite(maps).all()
    with pytest.raises(CheckpointMismatchError, match="explains model"):  # trained for other weights
        create_method("diffmask", create_model(f"hf:{other}")[0], checkpoint=path)


def test_folder_without_config_json_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json"):
        create_model(f"hf:{tmp_path}")


def test_bench_on_a_cifar10_folder_with_a_hf_model(hf, tmp_path, one_thread):
    _, folder, _ = hf
    write_cifar(tmp_path / "data", n_per_batch=12)
    cfg = BenchConfig(run="hf", results_dir=str(tmp_path / "results"), model=f"hf:{folder}",
                      datasets=("cifar10",), data_root=str(tmp_path / "data"), methods=("random", "rollout"),
                      operators=("mean", "drop"), n_images=6, steps=2)
    run_benchmark(cfg, progress=False)
    scores = pd.read_csv(tmp_path / "results" / "hf" / "scores.csv")
    assert set(scores.method) == {"random", "rollout"} and set(scores.operator) == {"mean", "drop"}
    assert scores.model.iloc[0].startswith("hf-") and scores.model.nunique() == 1
    assert scores.value.notna().all() and scores.sample_id.nunique() == 6
