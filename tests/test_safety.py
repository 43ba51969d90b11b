"""Nothing lost, nothing silently wrong: run names, concurrent writers, untrusted files, bad
config values, damaged caches, and one-line errors (exit 2, or 130 on Ctrl-C) for bad input."""

import errno
import json
import os
import pickle
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_vit
from test_files import write_cifar

from patchbench import cli
from patchbench.bench import runner
from patchbench.bench.config import BenchConfig, check_types, read_config
from patchbench.bench.results import RunFolderError, write_run
from patchbench.datasets import create_dataset
from patchbench.methods import plugins
from patchbench.models.hub import CheckpointError, read_state_dict


def bench(tmp_path, *args):
    return cli.main(["bench", "--results-dir", str(tmp_path), "--quiet", *args])


def fail_fast(monkeypatch):
    """The runner's work is replaced by an error: a test of an early refusal must never reach it."""
    def never(*a, **k):
        raise AssertionError("the run started its work")

    monkeypatch.setattr(runner, "_run", never)


def marker_writer(text):
    return {"run.json": lambda p: p.write_text(json.dumps({"patchbench_version": "x", "text": text}))}


# ---- 1. run names never reach outside the results folder, never replace foreign folders ----------

@pytest.mark.parametrize("name", ["", "/tmp", "../x", "a/b", "..", ".chunks", "x/../../y", " "])
def test_bad_run_names_are_refused_before_any_work(name, tmp_path, monkeypatch, capsys):
    fail_fast(monkeypatch)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert bench(tmp_path / "results", "--run", name) == 2
    err = capsys.readouterr().err
    assert f"run name {name!r} is not allowed" in err and err.count("\n") == 1
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_a_folder_patchbench_did_not_write_is_never_replaced(tmp_path, monkeypatch, capsys):
    fail_fast(monkeypatch)
    mine = tmp_path / "results" / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    assert bench(tmp_path / "results", "--run", "mine") == 2
    assert "is not a patchbench run folder" in capsys.readouterr().err
    with pytest.raises(RunFolderError):
        write_run(mine, marker_writer("new"))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # a run.json that is not patchbench's does not make a folder ours either
    (mine / "run.json").write_text('{"something": "else"}')
    with pytest.raises(RunFolderError):
        write_run(mine, marker_writer("new"))


def test_an_earlier_run_or_an_empty_folder_is_replaced(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    write_run(run_dir, marker_writer("first"))
    write_run(run_dir, {**marker_writer("second"), "extra.txt": lambda p: p.write_text("x")})
    assert json.loads((run_dir / "run.json").read_text())["text"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", "r"]


# ---- 3. writers of the same run folder take turns; leftovers of killed writers are cleaned --------

def test_concurrent_writers_of_one_run_folder(tmp_path):
    run_dir = tmp_path / "r"
    errors = []

    def writer(i):
        def slow(p):
            time.sleep(0.02)
            p.write_text(str(i))

        try:
            for _ in range(5):
                write_run(run_dir, {**marker_writer(str(i)), "a.txt": slow, "b.txt": slow})
        except Exception as e:  # noqa: BLE001 - any error is the failure under test
            errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # one writer's whole folder, nothing mixed, nothing left behind
    a, b = (run_dir / "a.txt").read_text(), (run_dir / "b.txt").read_text()
    assert a == b == json.loads((run_dir / "run.json").read_text())["text"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", "r"]


def test_leftovers_of_a_killed_writer_are_cleaned_and_a_swapped_out_run_comes_back(tmp_path):
    run_dir = tmp_path / "r"
    write_run(run_dir, marker_writer("previous"))
    # killed between its two renames: the previous run sits in .r.old-*/run, no run folder
    old = tmp_path / ".r.old-abc"
    old.mkdir()
    os.replace(run_dir, old / "run")
    (tmp_path / ".r.staging-def").mkdir()
    (tmp_path / ".r.staging-def" / "half.csv").write_text("half")

    def broken(p):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_run(run_dir, {**marker_writer("new"), "big.csv": broken})
    assert json.loads((run_dir / "run.json").read_text())["text"] == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", "r"]


# ---- 4. a CIFAR batch from a stranger cannot run code -------------------------------------------

class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "owned"))


def test_cifar_batch_with_a_code_payload_is_refused_and_not_run(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "owned.txt"
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": Payload(marker)}, f)
    with open(marker.with_suffix(".check"), "wb") as f:  # the payload does run under plain pickle
        pickle.dump(Payload(marker.with_suffix(".ran")), f)
    with open(marker.with_suffix(".check"), "rb") as f:
        pickle.load(f)
    assert marker.with_suffix(".ran").exists()
    with pytest.raises(ValueError, match="pathlib.*not a readable CIFAR-10 batch|not a readable CIFAR"):
        create_dataset("cifar10", "test", data_root=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batches_of_any_protocol_still_read(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(tmp_path)
    data = np.arange(4 * 3072, dtype=np.int64).astype(np.uint8).reshape(4, 3072)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": [1, 2, 3, 4], b"data": data,
                     b"filenames": [b"a.png"] * 4}, f, protocol=protocol)
    x, y, _ = create_dataset("cifar10", "test", data_root=tmp_path).tensors()
    assert y.tolist() == [1, 2, 3, 4]
    assert torch.equal((x[1] * 255).round().byte(), torch.from_numpy(data[1].reshape(3, 32, 32)))


def test_truncated_cifar_batch_is_named(tmp_path):
    write_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(ValueError, match="test_batch is not a readable CIFAR-10 batch"):
        create_dataset("cifar10", "test", data_root=tmp_path)


# ---- 8. one-line errors -------------------------------------------------------------------------

@pytest.mark.parametrize("steps", ["1", "-3"])
def test_steps_below_two_are_refused(steps, tmp_path, monkeypatch, capsys):
    fail_fast(monkeypatch)
    assert bench(tmp_path, "--steps", steps) == 2
    err = capsys.readouterr().err
    assert f"steps must be 0 (one step per patch) or at least 2, got {steps}" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("text,needle", [
    ('n_images = "twenty"', "n_images must be an integer, got 'twenty'"),
    ('methods = "rollout"', 'methods must be a list of strings, got \'rollout\'; e.g. methods = ["rollout"]'),
    ("steps = 1.5", "steps must be an integer, got 1.5"),
    ('pretrained = "yes"', "pretrained must be true or false, got 'yes'"),
    ("seed = true", "seed must be an integer, got True"),
    ("datasets = [1, 2]", "datasets must be a list of strings, got [1, 2]"),
    ("operator_options = 3", "operator_options must be a table, got 3"),
    ("[operator_options.mean]\ncolor = [0, 0, 0]", "operator_options.mean: unknown option 'color' "
                                                    "(did you mean 'colour'?); valid options: colour"),
    ("[method_options.rollout]\ndiscard = 0.5", "method_options.rollout: unknown option 'discard' "
                                                 "(did you mean 'discard_ratio'?)"),
    ("[dataset_options.imagefolder]\nclass_idx = 'x'", "dataset_options.imagefolder: unknown option"),
])
def test_bad_config_values_name_the_key_and_what_was_expected(text, needle, tmp_path, monkeypatch, capsys):
    fail_fast(monkeypatch)
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    assert bench(tmp_path, "--config", str(path)) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert "unknown option" in needle or f"{path}: {needle}" in err  # type errors name the file


def test_python_callers_get_the_same_type_check():
    with pytest.raises(ValueError, match="n_images must be an integer"):
        BenchConfig(n_images="7").validate()
    check_types({"methods": ("a", "b"), "steps": None, "chunk_size": 3, "method_options": {"x": {}}})


def test_truncated_safetensors_checkpoint_is_a_one_line_error(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(100, 100)}, str(path))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="w.safetensors is not a readable safetensors file"):
        read_state_dict(path)
    code = cli.main(["bench", "--model", "vit_tiny_patch16_224", "--checkpoint", str(path),
                     "--datasets", "imagefolder", "--data-root", str(tmp_path), "--results-dir",
                     str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a readable safetensors file" in err and err.count("\n") == 1


def test_a_non_image_file_in_an_image_folder_is_named(tmp_path):
    from PIL import Image

    (tmp_path / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "ok.png")
    (tmp_path / "cat" / "notes.jpg").write_text("not an image")
    ds = create_dataset("imagefolder", "test", data_root=tmp_path)
    with pytest.raises(ValueError, match=r"notes.jpg is not a readable image"):
        ds.tensors()


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def disk_full(path):
        path.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(cli, "_bench", lambda args: write_run(tmp_path / "r", {
        **marker_writer("x"), "scores.csv": disk_full}))
    assert cli.main(["bench", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("patchbench: error: No space left on device: ") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks"]


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_bench", interrupted)
    assert cli.main(["bench"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("patchbench: interrupted") and err.count("\n") == 1


def test_corrupt_cached_model_is_retrained(tmp_path, monkeypatch, capsys, one_thread):
    from patchbench.models.zoo import TrainConfig, checkpoint_path, load_model, model_key

    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path))
    cfg = TrainConfig(train_size=64, test_size=32)
    _, first = load_model("pb-vit-tiny", "glyphs", cfg, progress=False)
    path = checkpoint_path(model_key("pb-vit-tiny", "glyphs", cfg))
    good = path.read_bytes()
    for damage in (good[: len(good) // 2], b"garbage"):
        path.write_bytes(damage)
        adapter, meta = load_model("pb-vit-tiny", "glyphs", cfg, progress=False)
        assert "is unreadable" in capsys.readouterr().err
        assert meta["test_accuracy"] == first["test_accuracy"]  # the same deterministic training
        assert path.read_bytes() != damage


def test_corrupt_cached_explainer_is_retrained(tmp_path, monkeypatch, capsys, one_thread):
    from patchbench.methods.diffmask_train import DiffMaskConfig, train_or_load
    from patchbench.models import ViTAdapter

    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path))
    adapter = ViTAdapter(tiny_vit(), key="tiny-test")  # glyphs are resized to its 16 x 16 input
    cfg = DiffMaskConfig(steps=2, batch_size=4)
    path = train_or_load(adapter, "glyphs", cfg, n_train=8, progress=False)
    path.write_bytes(b"PK\x03\x04 truncated")
    assert train_or_load(adapter, "glyphs", cfg, n_train=8, progress=False) == path
    assert "cached DiffMask explainer" in capsys.readouterr().err
    assert torch.load(path, weights_only=True)["meta"]["model_key"] == "tiny-test"


# ---- 9. shipped configs work from any folder -----------------------------------------------------

def test_config_names_work_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert read_config("default")["run"] == "default"
    assert read_config("ci")["run"] == "ci"


# ---- 10. dataset plugins load without a warning; files get the user's umask ----------------------

def test_a_dataset_plugin_loads_without_a_spurious_warning(tmp_path):
    from patchbench.datasets import DATASETS

    path = tmp_path / "my_data.py"
    path.write_text(
        "from patchbench.datasets.synthetic import DATASETS\n"
        "from patchbench.datasets.base import GroundTruthDataset\n\n"
        "@DATASETS.register('plugin-data-test')\n"
        "class Mine(GroundTruthDataset):\n"
        "    name = 'plugin-data-test'\n")
    try:
        assert plugins.load_plugin(str(path)) == []
        assert "plugin-data-test" in DATASETS.list()
    finally:
        DATASETS.unregister("plugin-data-test")


def test_run_folders_and_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_run(tmp_path / "r", {**marker_writer("x"), "report.html": lambda p: p.write_text("<p>")})
        from patchbench.utils import write_text

        write_text(tmp_path / "r2.txt", "x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "r") == 0o755
    assert mode(tmp_path / "r" / "run.json") == mode(tmp_path / "r" / "report.html") == 0o644
    assert mode(tmp_path / "r2.txt") == 0o644


# ---- 2. a method that edits the model's weights fails, and the weights come back ----------------

VANDAL = """\
import torch
from patchbench.methods import Method


class Vandal(Method):
    name = "vandal"

    def _attribute(self, images, target):
        with torch.no_grad():
            self.adapter.model.head.weight.mul_(0.0)  # every later method would score on this
        return torch.rand(images.shape[0], *self.adapter.grid)
"""
GUARDED = dict(datasets=("glyphs",), operators=("mean",), n_images=6, steps=2, sanity_images=0,
               gallery_size=0)


def test_a_method_that_changes_the_weights_fails_and_stores_nothing(tmp_path, glyphs_model, one_thread):
    from patchbench.bench import run_benchmark
    from patchbench.methods import METHODS
    from patchbench.utils import weights_digest

    plugin = tmp_path / "vandal.py"
    plugin.write_text(VANDAL)
    results = tmp_path / "results"
    digest = weights_digest(glyphs_model[0].model)
    try:
        out = run_benchmark(BenchConfig(run="v", results_dir=str(results), plugins=(str(plugin),),
                                        methods=("vandal", "rollout"), **GUARDED), progress=False)
    finally:
        METHODS.unregister("vandal")
    assert [f["method"] for f in out["failures"]] == ["vandal"]
    assert "changed the model's weights" in out["failures"][0]["error"]
    assert "were restored" in out["failures"][0]["error"]
    assert weights_digest(glyphs_model[0].model) == digest  # the shared cached model is intact
    clean = run_benchmark(BenchConfig(run="c", results_dir=str(tmp_path / "clean"),
                                      methods=("rollout",), **GUARDED), progress=False)
    # rollout scored on the trained model, not on the vandalised one
    cols = ["metric", "sample_id", "value"]
    assert out["scores"][cols].equals(clean["scores"][cols])
    assert out["run"]["models"]["glyphs"]["weights_digest"] == digest[:24]
    stored = [torch.load(p, weights_only=True)["key"] for p in (results / ".chunks").glob("*.pt")]
    assert stored and all(k["weights"] == digest[:24] for k in stored)
    assert not any("vandal" in json.dumps(k) for k in stored)


def test_the_guard_restores_weights_and_refuses_a_changed_structure(tiny):
    from patchbench.bench.guard import ModelChangedError, WeightGuard, WeightsLostError

    model = tiny.model
    guard = WeightGuard(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guard.check("nobody")  # unchanged: nothing happens
    with torch.no_grad():
        model.pos_embed.add_(1.0)
        model.blocks[0].norm1.bias[0] = 3.0
    with pytest.raises(ModelChangedError, match="'m' changed the model's weights"):
        guard.check("'m'")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.register_buffer("extra", torch.zeros(1))
    try:
        with pytest.raises(WeightsLostError):
            guard.check("'m'")
    finally:
        del model._buffers["extra"]


# ---- 5. images of any size and mode reach the model through its own transform ---------------------

def write_mixed_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    picture = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    picture(500, 375).save(root / "a" / "wide.jpg", quality=95)
    picture(333, 500).save(root / "a" / "tall.png")
    picture(64, 64).convert("L").save(root / "a" / "grey.png")
    picture(200, 120).convert("RGBA").save(root / "b" / "alpha.png")
    picture(150, 210).convert("CMYK").save(root / "b" / "cmyk.jpg")
    picture(90, 90).convert("P").save(root / "b" / "palette.png")
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("crop_mode,crop_pct", [("center", 0.9), ("squash", 0.95), ("border", 1.0),
                                                (None, 0.875)])
def test_image_folder_of_mixed_sizes_matches_timms_transform(tmp_path, crop_mode, crop_pct):
    from PIL import Image
    from timm.data import create_transform

    from patchbench.models.hub import create_model

    files = write_mixed_folder(tmp_path / "data")
    adapter, _ = create_model("vit_tiny_patch16_224")
    adapter.data_config = {**adapter.data_config, "crop_mode": crop_mode, "crop_pct": crop_pct}
    ds = create_dataset("imagefolder", "test", data_root=tmp_path / "data")
    ds.transform = adapter.pixel_transform()
    pixels, labels, masks = ds.tensors()
    assert pixels.shape == (6, 3, 224, 224) and masks.shape == (6, 224, 224)
    timm_tf = create_transform(**{**adapter.data_config, "crop_mode": crop_mode, "crop_pct": crop_pct},
                               is_training=False)
    for i, path in enumerate(files):
        with Image.open(path) as im:
            expected = timm_tf(im.convert("RGB"))
        torch.testing.assert_close(adapter.prepare(pixels[i:i + 1])[0], expected, rtol=0, atol=1e-6)


def test_hf_models_read_images_through_their_image_processor(tmp_path):
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from patchbench.models.hub import create_model

    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, num_labels=3)
    folder = tmp_path / "vit"
    transformers.ViTForImageClassification(cfg).save_pretrained(folder)
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, resample=3,
                                               image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4])
    processor.save_pretrained(folder)
    adapter, _ = create_model(f"hf:{folder}")
    files = write_mixed_folder(tmp_path / "data")
    ds = create_dataset("imagefolder", "test", data_root=tmp_path / "data")
    ds.transform = adapter.pixel_transform()
    pixels = ds.tensors()[0]
    for i, path in enumerate(files):
        with Image.open(path) as im:
            expected = processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(adapter.prepare(pixels[i:i + 1])[0], expected, rtol=0, atol=1e-5)


def test_bench_on_a_folder_of_mixed_images(tmp_path, one_thread):
    write_mixed_folder(tmp_path / "data")
    code = cli.main(["bench", "--model", "vit_tiny_patch16_224", "--datasets", "imagefolder",
                     "--data-root", str(tmp_path / "data"), "--methods", "random,centre",
                     "--operators", "mean,drop", "--n-images", "6", "--steps", "2",
                     "--sanity-images", "0", "--results-dir", str(tmp_path / "r"), "--run", "mixed",
                     "--quiet"])
    assert code == 0
    run = json.loads((tmp_path / "r" / "mixed" / "run.json").read_text())
    meta = run["models"]["imagefolder"]
    # an image folder has no training split: the mean colour is the model's normalisation mean
    assert meta["mean_colour"]["source"].startswith("the model's normalisation mean")
    assert meta["mean_colour"]["model_input"] == [0.0, 0.0, 0.0]


# ---- 6. the mean colour is the dataset's, so an image's scores do not depend on the others -------

def test_mean_colour_is_the_training_splits_and_cached(tmp_path, monkeypatch):
    from patchbench.datasets.stats import train_mean_colour

    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path))
    write_cifar(tmp_path / "c")
    colour = train_mean_colour("cifar10", data_root=str(tmp_path / "c"))
    train = create_dataset("cifar10", "train", data_root=tmp_path / "c")
    expected = np.concatenate([train.data.reshape(-1, 3)]).mean(0) / 255
    np.testing.assert_allclose(colour["rgb"], expected, atol=1e-6)
    assert colour["source"] == "mean of the cifar10 training split (150 images)"
    assert train_mean_colour("cifar10", data_root=str(tmp_path / "c")) == colour
    assert len(list((tmp_path / "stats").glob("cifar10-mean-*.json"))) == 1
    assert train_mean_colour("imagefolder", data_root=str(tmp_path)) is None
    # generated data: the mean over the generated training images, slow loop as the reference
    small = train_mean_colour("toy-count", seed=3, options={"size": 40})
    x = create_dataset("toy-count", "train", size=40, seed=3).tensors()[0]
    np.testing.assert_allclose(small["rgb"], x.double().mean((0, 2, 3)).numpy(), atol=1e-6)


def test_an_images_scores_do_not_depend_on_the_other_images(tmp_path, glyphs_model, one_thread):
    from patchbench.bench import run_benchmark

    runs = {}
    for n in (4, 10):
        cfg = BenchConfig(run=f"n{n}", results_dir=str(tmp_path), datasets=("glyphs",),
                          methods=("random", "rollout"), operators=("mean", "drop"), n_images=n,
                          steps=4, sanity_images=0, gallery_size=0)
        runs[n] = run_benchmark(cfg, progress=False)
    small, big = runs[4]["scores"], runs[10]["scores"]
    assert set(small.sample_id) < set(big.sample_id)
    keys = ["method", "operator", "metric", "sample_id"]
    merged = small.merge(big, on=keys, suffixes=("_4", "_10"))
    assert len(merged) == len(small) and set(merged.operator) == {"-", "mean", "drop"}
    assert (merged.value_4 == merged.value_10).all()  # bit for bit
    colour = runs[4]["run"]["models"]["glyphs"]["mean_colour"]
    assert colour == runs[10]["run"]["models"]["glyphs"]["mean_colour"]
    assert colour["source"] == "mean of the glyphs training split (20000 images)"


# ---- 7. scores do not depend on the rows per forward pass ----------------------------------------

def test_scores_are_byte_identical_whatever_the_chunk_size_or_budget(tmp_path, glyphs_model, one_thread):
    from patchbench.bench import run_benchmark

    small = dict(datasets=("glyphs",), methods=("random", "rollout"), operators=("mean", "drop"),
                 n_images=12, steps=6, sanity_images=0, gallery_size=0, overwrite="always")
    for run, extra in {"default": {}, "chunk5": {"chunk_size": 5}, "chunk1000": {"chunk_size": 1000},
                       "budget": {"memory_budget": "3MiB"}}.items():
        run_benchmark(BenchConfig(run=run, results_dir=str(tmp_path), **small, **extra), progress=False)
    budget = json.loads((tmp_path / "budget" / "run.json").read_text())
    assert budget["models"]["glyphs"]["chunk_size"] < 64  # the budget did choose fewer rows
    reference = (tmp_path / "default" / "scores.csv").read_bytes()
    for run in ("chunk5", "chunk1000", "budget"):
        assert (tmp_path / run / "scores.csv").read_bytes() == reference, run


def test_fixed_rows_pads_and_never_changes_a_rows_result(tiny):
    calls = []

    def model(x):
        calls.append(x.shape[0])
        return x.flatten(1)[:, :3] * 2

    x = torch.randn(11, 3, 16, 16)
    from patchbench.models.adapter import in_blocks

    out = in_blocks(model, 4, x)
    assert calls == [4, 4, 4] and torch.equal(out, x.flatten(1)[:, :3] * 2)
    with tiny.fixed_rows(4):
        assert tiny.forward_rows == 4
        blocked = tiny.logits(x)
        keep = torch.rand(11, tiny.num_patches) > 0.5
        kept = tiny.forward_kept(x, keep)
    assert tiny.forward_rows is None
    torch.testing.assert_close(blocked, tiny.logits(x))
    torch.testing.assert_close(kept, tiny.forward_kept(x, keep))


# ---- 8. Ctrl-C in a real run: one line, exit 130, stored chunks kept ------------------------------

def test_sigint_during_a_run(tmp_path, glyphs_model):
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "patchbench", "bench", "--run", "i", "--results-dir", str(tmp_path),
           "--datasets", "glyphs", "--methods", "random,attention,rollout,integrated_gradients",
           "--operators", "mean,drop", "--n-images", "30", "--steps", "6", "--quiet"]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / ".chunks").glob("*.pt")):
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("patchbench: interrupted")
    assert list((tmp_path / ".chunks").glob("*.pt")) and not (tmp_path / "i").exists()


def test_disk_full_while_storing_a_chunk_stops_the_run_in_one_line(tmp_path, glyphs_model, monkeypatch,
                                                                    capsys, one_thread):
    from patchbench.bench import chunks

    def full(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(chunks.torch, "save", full)
    code = bench(tmp_path, "--run", "full", "--datasets", "glyphs", "--methods", "random,rollout",
                 "--operators", "mean", "--n-images", "4", "--steps", "2", "--sanity-images", "0")
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("patchbench: error: No space left on device: ")
    assert err.count("\n") == 1  # not a method failure per method, not a traceback
    assert not (tmp_path / "full").exists()
    assert [p.name for p in (tmp_path / ".chunks").iterdir()] == []  # no half-written chunk
