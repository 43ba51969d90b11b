"""Embedded models: cache keys, deterministic training, cache reuse."""

import dataclasses

import pytest
import torch

from patchbench.models import zoo
from patchbench.utils import file_digest as _digest


def test_key_depends_on_everything_that_fixes_the_weights():
    cfg = zoo.TrainConfig()
    keys = {zoo.model_key("pb-vit-tiny", "glyphs", cfg), zoo.model_key("pb-vit-tiny", "toy-count", cfg)}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        changed = dataclasses.replace(cfg, **{field.name: value * 2 if value else 1})
        keys.add(zoo.model_key("pb-vit-tiny", "glyphs", changed))
    assert len(keys) == 2 + len(dataclasses.fields(cfg))


def test_key_changes_with_the_training_or_data_code(monkeypatch):
    key = zoo.model_key("pb-vit-tiny", "glyphs", zoo.TrainConfig())
    for edited in ("zoo.py", "synthetic.py"):
        with monkeypatch.context() as m:
            m.setattr(zoo, "file_digest",
                      lambda path, e=edited: "x" if str(path).endswith(e) else _digest(path))
            assert zoo.model_key("pb-vit-tiny", "glyphs", zoo.TrainConfig()) != key, edited
    assert zoo.model_key("pb-vit-tiny", "glyphs", zoo.TrainConfig()) == key


def test_training_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path))
    cfg = zoo.TrainConfig(train_size=128, test_size=64, batch_size=32)
    a, meta = zoo.load_model("pb-vit-tiny", "glyphs", cfg, progress=False)
    assert zoo.checkpoint_path(meta["key"]).exists()
    b, _ = zoo.train_model("pb-vit-tiny", "glyphs", cfg, progress=False)
    for (k, va), vb in zip(a.model.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the model is cached")

    monkeypatch.setattr(zoo, "train_model", no_training)
    c, meta_c = zoo.load_model("pb-vit-tiny", "glyphs", cfg, progress=False)
    assert meta_c == meta and c.key == a.key
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(c.logits(x), a.logits(x))
    assert list(tmp_path.rglob("*.tmp")) == []


def test_missing_model_without_training(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="patchbench train"):
        zoo.load_model("pb-vit-tiny", "glyphs", zoo.TrainConfig(seed=7), train_if_missing=False)


def test_default_model_meets_accuracy_bar(glyphs_model):
    _, meta = glyphs_model
    assert meta["test_accuracy"] >= 0.98
