"""timm models by name and from local checkpoints; a bench on a CIFAR-10 folder (offline)."""

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from test_files import write_cifar

from patchbench.bench import BenchConfig, run_benchmark
from patchbench.methods import create_method
from patchbench.methods.base import token_free_methods
from patchbench.models import ImageAdapter, NotAViTError
from patchbench.models.hub import CheckpointError, create_timm_model
from patchbench.registry import UnknownNameError

NAME = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    adapter, _ = create_timm_model(NAME, num_classes=10)
    with torch.no_grad():  # timm's init gives near-constant logits; make the weights distinctive
        for p in adapter.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("ckpt")
    state = {k: v.contiguous() for k, v in adapter.model.state_dict().items()}
    torch.save({"state_dict": state}, root / "model.pth")
    save_file(state, str(root / "model.safetensors"))
    return adapter, root


@pytest.mark.parametrize("file", ["model.pth", "model.safetensors"])
def test_checkpoint_round_trip_gives_same_maps(saved, file):
    adapter, root = saved
    loaded, meta = create_timm_model(NAME, checkpoint=root / file, num_classes=10)
    assert meta["data_config"]["input_size"] == (3, 224, 224) and loaded.grid == (14, 14)
    x = loaded.prepare(torch.rand(2, 3, 32, 32))  # resized by the model's data config
    assert x.shape == (2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.logits(x), adapter.logits(x))
    t = torch.tensor([1, 2])
    for method in ("attention", "rollout"):
        assert torch.equal(create_method(method, loaded).attribute(x, t),
                           create_method(method, adapter).attribute(x, t))


def test_checkpoint_that_does_not_fit_names_keys_and_shapes(saved):
    _, root = saved
    with pytest.raises(CheckpointError, match=r"head.weight: checkpoint \[10, 192\] vs model \[7, 192\]"):
        create_timm_model(NAME, checkpoint=root / "model.pth", num_classes=7)
    loaded, _ = create_timm_model(NAME, checkpoint=root / "model.pth")  # classes from the file
    assert loaded.num_classes == 10
    other = root / "other.pth"
    torch.save({k: v for k, v in torch.load(root / "model.pth")["state_dict"].items()
                if not k.startswith("blocks.11")}, other)
    with pytest.raises(CheckpointError, match=r"missing keys \(e.g. blocks.11"):
        create_timm_model(NAME, checkpoint=other)
    with pytest.raises(FileNotFoundError):
        create_timm_model(NAME, checkpoint=root / "missing.pth")
    (root / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        create_timm_model(NAME, checkpoint=root / "junk.pth")


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownNameError, match="Did you mean 'vit_tiny_patch16_224'"):
        create_timm_model("vit_tiny_patch16_22")


def test_non_vit_model_serves_token_free_methods_and_refuses_the_others():
    torch.manual_seed(0)
    adapter, meta = create_timm_model("resnet18", num_classes=4)
    assert isinstance(adapter, ImageAdapter) and not adapter.is_vit and meta["vit"] is False
    # the grid is the stride of the last feature map, read from timm's feature_info
    assert adapter.patch_size == (32, 32) and adapter.grid == (7, 7) and adapter.cam_layer == "layer4"
    x = adapter.prepare(torch.rand(2, 3, 40, 40))
    t = torch.tensor([0, 3])
    for name in token_free_methods():
        opts = {"n_steps": 4} if name == "integrated_gradients" else {}
        maps = create_method(name, adapter, **opts).attribute(x, t)
        assert maps.shape == (2, 7, 7) and maps.abs().sum() > 0
    assert {"random", "gradcam", "integrated_gradients"} <= set(token_free_methods())
    for name in ("attention", "rollout", "diffmask"):
        with pytest.raises(NotAViTError, match=rf"'{name}' needs a vision transformer.*ResNet is not one"):
            create_method(name, adapter)


def test_bench_on_a_non_vit_model(tmp_path):
    write_cifar(tmp_path / "data", n_per_batch=20)
    common = dict(results_dir=str(tmp_path / "results"), model="resnet18", datasets=("cifar10",),
                  data_root=str(tmp_path / "data"), n_images=6, steps=2)
    with pytest.raises(NotAViTError, match=r"not a vision transformer.*rollout, drop.*--methods "):
        run_benchmark(BenchConfig(run="bad", methods=("random", "rollout"), operators=("mean", "drop"),
                                  **common), progress=False)
    assert not (tmp_path / "results" / "bad").exists()
    run_benchmark(BenchConfig(run="cnn", methods=("random", "gradcam"), operators=("mean", "noise"),
                              **common), progress=False)
    scores = pd.read_csv(tmp_path / "results" / "cnn" / "scores.csv")
    assert set(scores.method) == {"random", "gradcam"} and set(scores.operator) == {"mean", "noise"}
    assert scores.value.notna().all() and scores.sample_id.nunique() == 6


def test_bench_on_a_cifar10_folder_with_a_timm_checkpoint(saved, tmp_path):
    _, root = saved
    write_cifar(tmp_path / "data", n_per_batch=40)
    cfg = BenchConfig(run="cifar", results_dir=str(tmp_path / "results"), model=NAME,
                      checkpoint=str(root / "model.pth"), datasets=("cifar10",),
                      data_root=str(tmp_path / "data"), methods=("random", "attention"),
                      operators=("mean", "drop"), n_images=10, steps=4)
    out = run_benchmark(cfg, progress=False)
    scores = pd.read_csv(tmp_path / "results" / "cifar" / "scores.csv")
    assert set(scores.dataset) == {"cifar10"} and scores.model.iloc[0].startswith(NAME)
    assert "auroc" not in set(scores.metric)  # no ground truth on CIFAR-10
    assert scores.sample_id.nunique() == 10
    assert out["run"]["models"]["cifar10"]["checkpoint"] == str(root / "model.pth")
