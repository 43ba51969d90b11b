"""DiffMask on datasets read from disk: batches streamed from the files, cache keyed by source."""

import pytest
import torch
from test_files import write_cifar, write_folder

from patchbench.bench import BenchConfig, run_benchmark
from patchbench.datasets import create_dataset
from patchbench.datasets.files import FileDataset
from patchbench.methods import create_method
from patchbench.methods.diffmask import diffmask_meta
from patchbench.methods.diffmask_train import DiffMaskConfig, PreparedImages, train_or_load
from patchbench.models.hub import create_timm_model

TINY = DiffMaskConfig(steps=3, batch_size=4)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    adapter, _ = create_timm_model("test_vit", num_classes=10)  # 160 px, 16-px patches
    return adapter


def test_prepared_images_stream_exactly_what_preparing_everything_gives(vit, tmp_path, monkeypatch):
    write_cifar(tmp_path, n_per_batch=6)
    ds = create_dataset("cifar10", "train", data_root=tmp_path)
    everything = vit.prepare(ds.tensors()[0])
    monkeypatch.setattr(FileDataset, "tensors", lambda *a, **k: pytest.fail("loaded every image"))
    stream = PreparedImages(ds, vit)
    idx = torch.tensor([5, 0, 29, 5])
    assert len(stream) == 30
    assert torch.equal(stream[idx], everything[idx])


def test_train_or_load_on_a_cifar10_folder_streams_and_caches_by_source(vit, tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a", tmp_path / "b"
    write_cifar(a, n_per_batch=6, seed=0)
    write_cifar(b, n_per_batch=6, seed=1)
    monkeypatch.setattr(FileDataset, "tensors", lambda *a, **k: pytest.fail("loaded every image"))
    path = train_or_load(vit, "cifar10", TINY, n_train=20, progress=False, data_root=str(a))
    meta = diffmask_meta(path)
    assert meta["model_key"] == vit.key and meta["num_states"] == vit.depth + 2
    stamp = path.stat().st_mtime_ns
    assert train_or_load(vit, "cifar10", TINY, n_train=20, progress=False, data_root=str(a)) == path
    assert path.stat().st_mtime_ns == stamp  # reused, not retrained
    other = train_or_load(vit, "cifar10", TINY, n_train=20, progress=False, data_root=str(b))
    assert other != path  # other data, other explainer
    images = torch.stack([create_dataset("cifar10", "test", data_root=a)[i][0] for i in range(2)])
    maps = create_method("diffmask", vit, checkpoint=str(path)).attribute(vit.prepare(images),
                                                                           torch.tensor([0, 1]))
    assert maps.shape == (2, *vit.grid) and torch.isfinite(maps).all()


def test_image_folder_needs_a_train_folder_for_diffmask(vit, tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path / "cache"))
    write_folder(tmp_path / "val", per_class=3)
    write_folder(tmp_path / "train", per_class=4)
    common = dict(model="test_vit", datasets=("imagefolder",), data_root=str(tmp_path / "val"),
                  methods=("random", "diffmask"), operators=("mean",), n_images=6, steps=2,
                  results_dir=str(tmp_path / "results"), diffmask_config={"steps": 2, "batch_size": 4})
    with pytest.raises(ValueError, match="--train-data-root"):
        run_benchmark(BenchConfig(run="bad", **common), progress=False)
    assert not (tmp_path / "results" / "bad").exists()
    out = run_benchmark(BenchConfig(run="ok", train_data_root=str(tmp_path / "train"), **common),
                        progress=False)
    assert set(out["scores"].method) == {"random", "diffmask"}
    assert out["run"]["models"]["imagefolder"]["diffmask"]["mean"]["dataset"] == "imagefolder"
