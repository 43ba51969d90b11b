"""Datasets on disk, tested offline with files the tests write."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from patchbench.datasets import create_dataset


def write_cifar(root, n_per_batch=30, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        batches[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return batches


def test_cifar10_reads_standard_batches(tmp_path):
    batches = write_cifar(tmp_path)
    test = create_dataset("cifar10", "test", data_root=tmp_path)
    data, labels = batches["test_batch"]
    x, y, m = test.tensors()
    assert x.shape == (30, 3, 32, 32) and y.tolist() == labels and not m.any()
    # channel-major rows: first 1024 bytes are the red plane
    assert torch.equal((x[3] * 255).round().byte(), torch.from_numpy(data[3].reshape(3, 32, 32)))
    assert test.classes[2] == "c2" and test.has_ground_truth is False
    train = create_dataset("cifar10", "train", data_root=tmp_path / "cifar-10-batches-py")
    assert len(train) == 150


def test_cifar10_limit_is_stratified_and_seeded(tmp_path):
    write_cifar(tmp_path, n_per_batch=200)
    a = create_dataset("cifar10", "test", data_root=tmp_path, limit=20, seed=1)
    counts = torch.bincount(a.labels, minlength=10)
    assert len(a) == 20 and counts.max() - counts.min() <= 1  # 2 of every class
    b = create_dataset("cifar10", "test", data_root=tmp_path, limit=20, seed=1)
    assert a.indices == b.indices
    assert a.indices != create_dataset("cifar10", "test", data_root=tmp_path, limit=20, seed=2).indices


def test_cifar10_bad_layout_names_the_expected_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1 … data_batch_5, test_batch"):
        create_dataset("cifar10", "test", data_root=tmp_path)
    with pytest.raises(ValueError, match="needs --data-root"):
        create_dataset("cifar10", "test")
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"other": 1}))
    with pytest.raises(ValueError, match="is not a CIFAR-10 batch"):
        create_dataset("cifar10", "test", data_root=tmp_path)


def write_folder(root, classes=("n02", "n01", "n03"), per_class=4, size=(20, 24)):
    rng = np.random.default_rng(0)
    pixels = {}
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"img{i}.png")
            pixels[(c, i)] = arr
    (root / classes[0] / "notes.txt").write_text("not an image")
    return pixels


def test_imagefolder_sorted_classes_and_exact_pixels(tmp_path):
    pixels = write_folder(tmp_path)
    ds = create_dataset("imagefolder", data_root=tmp_path)
    assert ds.classes == ["n01", "n02", "n03"] and ds.num_classes == 3 and len(ds) == 12
    x, y, _ = ds.tensors()
    assert x.shape == (12, 3, 20, 24) and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal((x[5] * 255).round().byte().permute(1, 2, 0), torch.from_numpy(pixels[("n02", 1)]))


def test_imagefolder_class_index_file(tmp_path):
    write_folder(tmp_path)
    index = tmp_path / "class_index.json"
    index.write_text(json.dumps({"0": ["n03", "c"], "1": ["n09", "z"], "2": ["n01", "a"], "3": ["n02", "b"]}))
    ds = create_dataset("imagefolder", data_root=tmp_path, class_index=index, limit=6)
    assert ds.num_classes == 4
    assert sorted(ds.labels.tolist()) == [0, 0, 2, 2, 3, 3]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n01": 0}))
    with pytest.raises(ValueError, match="not in the class index"):
        create_dataset("imagefolder", data_root=tmp_path, class_index=bad)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"root/<class>/<image>"):
        create_dataset("imagefolder", data_root=tmp_path)
    write_folder(tmp_path / "mixed", classes=("a",), size=(8, 8))
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(tmp_path / "mixed" / "a" / "odd.png")
    with pytest.raises(ValueError, match="different sizes"):
        create_dataset("imagefolder", data_root=tmp_path / "mixed").tensors()
