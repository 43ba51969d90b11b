"""Fine-tuning a timm model on a CIFAR-10 folder: exact resume, weights that load back, the CLI
(offline: a tiny timm ViT on files the tests write)."""

import dataclasses
import json
import pickle

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from test_files import write_cifar

from patchbench.cli import main
from patchbench.datasets import create_dataset
from patchbench.models.finetune import FinetuneConfig, finetune
from patchbench.models.hub import create_timm_model

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "test_vit"  # timm's 160x160, 16-px-patch ViT of 0.37M parameters
# 40 training images, 8 a step: 5 steps an epoch, 10 in all
CFG = FinetuneConfig(epochs=2, batch_size=8, lr=1e-3, eval_images=8)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, n_per_batch=8)
    return root


@pytest.fixture(scope="module")
def trained(cifar, tmp_path_factory):
    """One uninterrupted run."""
    out = tmp_path_factory.mktemp("trained")
    metrics = finetune(MODEL, "cifar10", str(cifar), out, CFG, device="cpu", progress=False)
    return out, metrics


def _last(out):
    return torch.load(out / "last.pt", map_location="cpu", weights_only=True)


def test_interrupted_run_resumes_to_the_same_weights(cifar, trained, tmp_path):
    out_b, metrics_b = trained
    out_a = tmp_path / "a"
    first = finetune(MODEL, "cifar10", str(cifar), out_a, CFG, device="cpu", max_steps=3, progress=False)
    assert first["steps"] == 3 and first["finished"] is False and "test_accuracy" not in first
    assert _last(out_a)["step"] == 3 and len(_last(out_a)["losses"]) == 3
    assert not (out_a / "model.safetensors").exists() and not (out_a / "metrics.json").exists()

    metrics_a = finetune(MODEL, "cifar10", str(cifar), out_a, CFG, device="cpu", progress=False)
    for metrics in (metrics_a, metrics_b):
        assert metrics["finished"] is True and metrics["steps"] == metrics["total_steps"] == 10
    weights_a = load_file(str(out_a / "model.safetensors"))
    weights_b = load_file(str(out_b / "model.safetensors"))
    assert weights_a.keys() == weights_b.keys() and weights_a["head.weight"].shape[0] == 10
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    last_a, last_b = _last(out_a), _last(out_b)
    assert last_a["step"] == last_b["step"] == 10 and len(last_a["losses"]) == 10
    assert last_a["losses"] == last_b["losses"]
    assert metrics_a["test_accuracy"] == metrics_b["test_accuracy"]
    saved = json.loads((out_a / "metrics.json").read_text())
    assert 0 <= saved["test_accuracy"] <= 1 and saved["eval_images"] == 8
    assert saved["steps"] == saved["total_steps"] == 10 and saved["finished"] is True
    assert saved["weights"] == str(out_a / "model.safetensors")


def test_written_weights_load_back_for_benchmarking(cifar, trained):
    out, metrics = trained
    loaded, meta = create_timm_model(MODEL, checkpoint=out / "model.safetensors")
    assert loaded.num_classes == 10 and meta["vit"] is True  # the classifier size comes from the file
    # the fine-tuned model: a fresh one with the weights of the final training checkpoint
    torch.manual_seed(1)
    net = timm.create_model(MODEL, num_classes=10).eval()
    net.load_state_dict(_last(out)["weights"])
    test = create_dataset("cifar10", "test", data_root=cifar, limit=CFG.eval_images, seed=CFG.seed)
    images, labels, _ = test.tensors()
    x = loaded.prepare(images)
    assert x.shape == (8, 3, 160, 160)
    with torch.no_grad():
        logits = loaded.logits(x)
        assert torch.equal(logits, net(x))
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    assert round(accuracy, 4) == metrics["test_accuracy"]


def test_resume_refuses_another_config_and_no_resume_starts_over(cifar, tmp_path):
    out = tmp_path / "out"
    finetune(MODEL, "cifar10", str(cifar), out, CFG, device="cpu", max_steps=2, progress=False)
    assert _last(out)["step"] == 2
    other = dataclasses.replace(CFG, lr=5e-4)
    with pytest.raises(ValueError, match="another run"):
        finetune(MODEL, "cifar10", str(cifar), out, other, device="cpu", max_steps=3, progress=False)
    assert _last(out)["step"] == 2  # untouched
    metrics = finetune(MODEL, "cifar10", str(cifar), out, other, device="cpu", max_steps=1,
                       resume=False, progress=False)
    last = _last(out)
    assert metrics["steps"] == 1 and last["step"] == 1 and len(last["losses"]) == 1
    assert last["config"]["lr"] == 5e-4


def test_bad_input_is_refused_with_a_useful_message(cifar, tmp_path, capsys):
    with pytest.raises(ValueError, match="cifar10"):
        finetune(MODEL, "glyphs", str(cifar), tmp_path / "out", CFG, device="cpu", progress=False)
    assert main(["train", "--model", MODEL, "--dataset", "cifar10"]) == 2
    err = capsys.readouterr().err
    assert "patchbench: error:" in err and "--data-root" in err
    assert not (tmp_path / "out").exists()


def test_cli_fine_tunes_end_to_end(cifar, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["train", "--model", MODEL, "--dataset", "cifar10", "--data-root", str(cifar),
                 "--out", str(out), "--epochs", "1", "--batch-size", "8", "--limit", "16",
                 "--device", "cpu", "--quiet"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["finished"] is True and metrics["steps"] == metrics["total_steps"] == 2
    assert metrics["config"]["limit"] == 16 and 0 <= metrics["test_accuracy"] <= 1
    assert (out / "model.safetensors").is_file() and metrics["weights"] == str(out / "model.safetensors")
    assert (out / "metrics.json").is_file() and (out / "last.pt").is_file()


COLOURS = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]])


def write_colour_cifar(root, n_per_batch=16, seed=0):
    """A CIFAR-10 folder where class k (0..3) is a noisy solid colour: trivially learnable."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        labels = np.arange(n_per_batch) % len(COLOURS)
        rng.shuffle(labels)
        planes = np.repeat(COLOURS[labels][:, :, None], 1024, axis=2)  # [N, 3, 1024], channel-major
        data = np.clip(planes + rng.integers(-20, 21, planes.shape), 0, 255).astype(np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data.reshape(n_per_batch, 3072), b"labels": labels.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)


def test_fine_tuning_learns_an_easy_task(tmp_path):
    write_colour_cifar(tmp_path / "data")
    # 80 training images, 10 steps an epoch
    cfg = FinetuneConfig(epochs=3, batch_size=8, lr=1e-3, warmup_fraction=0.1, eval_images=16)
    metrics = finetune(MODEL, "cifar10", str(tmp_path / "data"), tmp_path / "out", cfg, device="cpu",
                       progress=False)
    losses = _last(tmp_path / "out")["losses"]
    assert metrics["finished"] is True and len(losses) == 30
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert metrics["test_accuracy"] >= 0.75  # chance: 0.25
