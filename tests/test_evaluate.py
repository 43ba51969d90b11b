"""patchbench.evaluate: names or objects in (model, data, methods, operators), the results the
command line writes from out; the same scores as the named run."""

import pytest
import torch

import patchbench
from patchbench.bench import BenchConfig, run_benchmark
from patchbench.bench.runner import _load_samples
from patchbench.methods import create_method
from patchbench.models import create_operator

SMALL = dict(n_images=6, steps=4, sanity_images=4, gallery_size=0)
COLS = ["method", "operator", "metric", "value"]


@pytest.fixture(scope="module")
def named(glyphs_model, tmp_path_factory):
    cfg = BenchConfig(run="named", results_dir=str(tmp_path_factory.mktemp("named")), datasets=("glyphs",),
                      methods=("random", "rollout"), operators=("mean", "drop"), **SMALL)
    return run_benchmark(cfg, progress=False)


def test_names_give_the_named_runs_scores(named, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    out = patchbench.evaluate("pb-vit-tiny", "glyphs", ["rand*", "rollout"], ["mean", "drop"], **SMALL)
    assert out["scores"].equals(named["scores"])
    assert list(tmp_path.iterdir()) == []  # no results_dir: nothing written
    assert set(out) >= {"scores", "curves", "summary", "leaderboard", "markdown", "run", "failures"}


def test_objects_give_the_same_scores(named, glyphs_model, tmp_path, one_thread):
    adapter = glyphs_model[0]
    pixels, labels, masks, ids = _load_samples(BenchConfig(n_images=6), "glyphs", adapter)
    out = patchbench.evaluate(
        adapter.model, (pixels, labels, masks),
        [create_method("rollout", adapter), patchbench.METHODS.get("random")],
        [create_operator("drop")], results_dir=tmp_path, run="objects", **SMALL)
    assert out["failures"] == [] and (tmp_path / "objects" / "report.html").exists()
    got = out["scores"]
    for method in ("rollout", "random"):
        for op in ("drop", "-"):  # drop and localisation need nothing from the dataset's name
            a = got[(got.method == method) & (got.operator == op)][COLS].reset_index(drop=True)
            b = named["scores"]
            b = b[(b.method == method) & (b.operator == op)][COLS].reset_index(drop=True)
            assert len(a) > 0 and a.equals(b), (method, op)
    # the given instance is made again for each randomised model by the sanity check
    assert set(out["sanity"].method) == {"rollout", "random"}
    assert out["run"]["models"]["data"]["given"] is True


def test_bad_objects_say_what_was_expected(glyphs_model):
    with pytest.raises(ValueError, match=r"expected images \[N, 3, H, W\]"):
        patchbench.evaluate(glyphs_model[0].model, (torch.rand(4, 32, 32), torch.zeros(4)))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        patchbench.evaluate(glyphs_model[0].model, (torch.rand(4, 3, 32, 32) * 3, torch.zeros(4)))
    with pytest.raises(TypeError, match="methods are names, Method instances or Method classes"):
        patchbench.evaluate("pb-vit-tiny", "glyphs", [42])


def test_given_data_under_mean_takes_the_models_normalisation_mean(glyphs_model, one_thread):
    adapter = glyphs_model[0]
    pixels, labels, masks, _ = _load_samples(BenchConfig(n_images=4), "glyphs", adapter)
    out = patchbench.evaluate(adapter, (pixels, labels), ["random"], ["mean"], n_images=4, steps=2,
                              sanity_images=0)
    colour = out["run"]["models"]["data"]["mean_colour"]
    assert colour["source"].startswith("the model's normalisation mean")
    assert colour["model_input"] == [0, 0, 0]
