"""The worked examples in docs/adding-*.md run as written: each is one file, loaded as a plugin,
and scored in a run (on a tiny random ViT, so that no model is trained)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from patchbench.api import evaluate
from patchbench.datasets import DATASETS
from patchbench.metrics.scores import SCORES
from patchbench.models import OPERATORS
from patchbench.testing import tiny_adapter

DOCS = Path(__file__).resolve().parents[1] / "docs"
TINY = dict(n_images=8, steps=4, sanity_images=0, gallery_size=0)


def example(doc: str, tmp_path: Path) -> str:
    """The doc's first Python block, written to the file its first line names."""
    code = re.search(r"```python\n(.*?)```", (DOCS / doc).read_text(), re.S).group(1)
    name = re.match(r"# (\S+\.py)\n", code).group(1)
    (tmp_path / name).write_text(code)
    return str(tmp_path / name)


@pytest.fixture
def registries():
    """Plugins add to the global registries: restored after each test."""
    saved = [(r, dict(r._entries)) for r in (DATASETS, OPERATORS, SCORES)]
    yield
    for registry, entries in saved:
        registry._entries.clear()
        registry._entries.update(entries)


def test_the_dataset_example(tmp_path, registries, one_thread, monkeypatch):
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path / "cache"))
    stripes = example("adding-a-dataset.md", tmp_path)
    out = evaluate(tiny_adapter(num_classes=4), "stripes", ["random", "rollout"], ["mean"],
                   plugins=(stripes,), **TINY)
    assert out["failures"] == []
    scores = out["scores"]
    assert set(scores.dataset) == {"stripes"} and scores.sample_id.nunique() == 8
    assert {"auroc", "srg"} <= set(scores.metric)  # it has ground truth: localisation scores too
    # the mean operator's colour is the mean of its training split: a quarter of every image is
    # the white stripe, the rest noise of mean 0.15
    rgb = out["run"]["models"]["stripes"]["mean_colour"]["rgb"]
    assert rgb == pytest.approx([0.25 + 0.75 * 0.15] * 3, abs=0.005)


def test_the_operator_example(tmp_path, registries, one_thread):
    shift = example("adding-an-operator.md", tmp_path)
    out = evaluate(tiny_adapter(), "glyphs", ["random", "rollout"], ["shift"], plugins=(shift,),
                   seed=3, **TINY)
    assert out["failures"] == []
    assert out["run"]["models"]["glyphs"]["operators"]["shift"] == {"name": "shift", "level": 0.3}
    assert set(out["scores"][out["scores"].metric == "srg"].operator) == {"shift"}


def test_the_score_example(tmp_path, registries, one_thread):
    late = example("adding-a-score.md", tmp_path)
    out = evaluate(tiny_adapter(), "glyphs", ["random", "rollout"], ["mean"], plugins=(late,), **TINY)
    rows = out["scores"][out["scores"].metric == "late_drop"]
    assert len(rows) == 2 * 8
    curves = out["curves"]
    deletion = curves[(curves.curve == "deletion") & (curves.quantity == "prob") & (curves.step == 3)]
    want = deletion.set_index(["method", "sample_id"]).value  # step 3 of 4: the last interior point
    got = rows.set_index(["method", "sample_id"]).value
    assert got.to_dict() == pytest.approx(want.loc[got.index].to_dict(), abs=1e-6)
    assert "Late ↓" in out["markdown"]
