"""Maps computed elsewhere (--maps FILE) are scored like any method: the same maps give the
same scores as the method that made them, in every file format; bad files are one-line errors."""

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from patchbench import cli
from patchbench.bench import BenchConfig
from patchbench.bench.runner import _load_samples
from patchbench.methods import METHODS, create_method

ARGS = ["--datasets", "glyphs", "--operators", "mean,drop", "--n-images", "8", "--steps", "4",
        "--sanity-images", "4", "--gallery-size", "0", "--quiet"]


@pytest.fixture(scope="module")
def rollout_maps(glyphs_model):
    """The run's sample ids and rollout's maps of their images, computed outside the run."""
    adapter = glyphs_model[0]
    pixels, _, _, ids = _load_samples(BenchConfig(n_images=8), "glyphs", adapter)
    images = adapter.prepare(pixels)
    target = adapter.logits(images).argmax(1)
    return ids, create_method("rollout", adapter).attribute(images, target).detach()


def write(path, ids, maps):
    if path.suffix == ".pt":
        torch.save({i: m for i, m in zip(ids, maps)}, path)
    elif path.suffix == ".npz":
        np.savez(path, **{str(i): m.numpy() for i, m in zip(ids, maps)})
    else:  # safetensors: one tensor in sample order
        save_file({"maps": maps.contiguous()}, str(path))
    return path


@pytest.mark.parametrize("suffix", [".pt", ".npz", ".safetensors"])
def test_maps_file_scores_like_the_method_that_made_it(suffix, tmp_path, rollout_maps, one_thread):
    ids, maps = rollout_maps
    path = write(tmp_path / f"mine{suffix}", ids, maps)
    try:
        code = cli.main(["bench", "--run", "m", "--results-dir", str(tmp_path / "r"), "--methods",
                         "rollout,random", "--maps", str(path), *ARGS])
    finally:
        METHODS.unregister("maps:mine")
    assert code == 0
    scores = pd.read_csv(tmp_path / "r" / "m" / "scores.csv")
    assert set(scores.method) == {"rollout", "random", "maps:mine"}
    mine = scores[scores.method == "maps:mine"].drop(columns="method").reset_index(drop=True)
    rollout = scores[scores.method == "rollout"].drop(columns="method").reset_index(drop=True)
    assert len(mine) == len(rollout) > 0
    pd.testing.assert_frame_equal(mine, rollout)
    sanity = pd.read_csv(tmp_path / "r" / "m" / "sanity.csv")
    mine = sanity[sanity.method == "maps:mine"]  # nothing to recompute on a randomised model
    assert mine.verdict.str.startswith("not applicable: maps read from a file").all()
    assert mine.spearman.isna().all()


@pytest.mark.parametrize("damage,needle", [
    (lambda ids, maps: (ids[:-1], maps[:-1]), "has no map for 1 of the 8 sample ids of glyphs"),
    (lambda ids, maps: (ids, maps[:, :-1]), "the model's patch grid is [8, 8]"),
    (lambda ids, maps: (ids, maps.index_fill(0, torch.tensor([2]), float("nan"))),
     "has NaN or infinite values"),
])
def test_a_maps_file_that_does_not_fit_is_a_one_line_error(damage, needle, tmp_path, rollout_maps,
                                                          capsys, one_thread):
    path = write(tmp_path / "bad.pt", *damage(*rollout_maps))
    try:
        code = cli.main(["bench", "--run", "b", "--results-dir", str(tmp_path), "--methods", "random",
                         "--maps", str(path), *ARGS])
    finally:
        METHODS.unregister("maps:bad")
    err = capsys.readouterr().err
    assert code == 2 and needle in err and str(path) in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists()


def test_maps_in_sample_order_must_match_the_number_of_images(tmp_path, rollout_maps, capsys, one_thread):
    ids, maps = rollout_maps
    path = tmp_path / "short.safetensors"
    save_file({"maps": maps[:5].contiguous()}, str(path))
    try:
        assert cli.main(["bench", "--results-dir", str(tmp_path), "--methods", "random", "--maps",
                         str(path), *ARGS]) == 2
    finally:
        METHODS.unregister("maps:short")
    assert "has 5 maps in sample order; the run evaluates 8 images" in capsys.readouterr().err
