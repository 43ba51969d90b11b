import numpy as np
import pytest
import torch

from patchbench.datasets import create_dataset
from patchbench.datasets.synthetic import COLOURS

SYNTHETIC = ["toy-count", "glyphs"]


@pytest.mark.parametrize("name", SYNTHETIC)
def test_deterministic_and_index_stable(name):
    a = create_dataset(name, "test", size=50, seed=3)
    b = create_dataset(name, "test", size=10, seed=3)
    for i in (0, 7):
        xa, ya, ma = a[i]
        xb, yb, mb = b[i]
        assert torch.equal(xa, xb) and ya == yb and torch.equal(ma, mb)
    other_seed = create_dataset(name, "test", size=10, seed=4)[0][0]
    train = create_dataset(name, "train", size=10, seed=3)[0][0]
    assert not torch.equal(a[0][0], other_seed)
    assert not torch.equal(a[0][0], train)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_sample_contract(name):
    ds = create_dataset(name, "test", size=300)
    x, y, m = ds.tensors()
    assert x.shape == (300, 3, *ds.image_size) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert m.shape == (300, *ds.image_size) and m.dtype == torch.bool
    counts = torch.bincount(y, minlength=ds.num_classes)
    assert len(counts) == ds.num_classes and counts.min() > 300 / ds.num_classes / 3


def test_toy_count_ground_truth_is_the_red_cells():
    ds = create_dataset("toy-count", "test", size=100)
    x, y, m = ds.tensors()
    red = torch.tensor(COLOURS[0]).view(1, 3, 1, 1)
    is_red = ((x - red).abs().amax(1) < 0.2)  # noise is small against colour gaps
    assert torch.equal(is_red, m)
    assert torch.equal(m.flatten(1).sum(1), y * ds.cell * ds.cell)


def test_glyphs_ground_truth_is_one_glyph_cell():
    ds = create_dataset("glyphs", "test", size=100)
    for i in range(100):
        x, y, m = ds[i]
        rows, cols = np.nonzero(m.numpy())
        assert len(rows) == 64 and rows.max() - rows.min() == 7 and cols.max() - cols.min() == 7
        assert rows.min() % 8 == 0 and cols.min() % 8 == 0
        cell = x[:, rows.min():rows.min() + 8, cols.min():cols.min() + 8]
        bright = cell.amax(0) > 0.3
        assert torch.equal(bright, torch.from_numpy(ds.patterns[y]))


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="valid splits"):
        create_dataset("glyphs", "validation")
