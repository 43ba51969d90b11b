"""`patchbench speed`: every way of computing the curve agrees with patchbench's, and the report
is written from the measured rows (the timings themselves are checked by running it, not here)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from patchbench.bench.speed import SpeedConfig, naive_deletion, run_speed
from patchbench.cli import main
from patchbench.memory import DEFAULT_ROWS, choose_chunk, row_bytes
from patchbench.metrics import faithfulness_curves, prepare_reference
from patchbench.models import create_operator


def test_naive_loop_equals_the_harness(tiny):
    torch.manual_seed(0)
    images, maps = torch.randn(3, 3, 16, 16), torch.rand(3, 4, 4)
    target = torch.tensor([0, 3, 1])
    for name in ("mean", "drop"):
        op = create_operator(name)
        ref = prepare_reference(tiny, op, images, torch.arange(3))
        ours = faithfulness_curves(tiny, op, images, target, maps, ref, steps=None, curves=("deletion",))
        naive = naive_deletion(tiny, op, images, target, maps, ref.state, None)
        assert torch.allclose(naive, ours.prob["deletion"], atol=1e-6), name


def test_deletion_only_equals_the_deletion_of_all_curves(tiny):
    torch.manual_seed(1)
    images, maps, target = torch.randn(4, 3, 16, 16), torch.rand(4, 4, 4), torch.tensor([0, 1, 2, 3])
    op = create_operator("blur")
    ref = prepare_reference(tiny, op, images, torch.arange(4))
    every = faithfulness_curves(tiny, op, images, target, maps, ref, steps=5)
    only = faithfulness_curves(tiny, op, images, target, maps, ref, steps=5, curves=("deletion",))
    assert set(only.prob) == {"deletion"} and set(only.scores()) == {
        "deletion_prob_auc", "deletion_kl_auc", "deletion_logit_auc", "deletion_correct_auc",
        "chefer_positive"}
    for quantity in ("prob", "kl", "logit", "correct"):
        assert torch.equal(getattr(only, quantity)["deletion"], getattr(every, quantity)["deletion"])
    lerf = faithfulness_curves(tiny, op, images, target, maps, ref, steps=5, curves=("lerf",))
    assert torch.equal(lerf.kl["lerf"], every.kl["lerf"])
    with pytest.raises(ValueError, match="valid curves"):
        faithfulness_curves(tiny, op, images, target, maps, ref, curves=("deleted",))


def test_default_chunk_on_cpu_and_under_a_budget(tiny):
    x = torch.randn(1, 3, 16, 16)
    assert choose_chunk(tiny, x) == DEFAULT_ROWS["cpu"]
    assert choose_chunk(tiny, x, rows=9) == 9
    assert choose_chunk(tiny, x, budget=5 * row_bytes(tiny, x)) == 5


@pytest.fixture(scope="module")
def speed_run(tmp_path_factory, glyphs_model):
    out = tmp_path_factory.mktemp("speed")
    cfg = SpeedConfig(n_images=6, methods=("random", "rollout", "diffmask"), operators=("mean", "drop"),
                      repeats=1, batch_size=4, out=str(out))
    return run_speed(cfg, progress=False)


def test_every_run_of_the_same_work_gives_the_same_curve(speed_run):
    df = speed_run["rows"]
    same = df[df["table"] == "same_work"].set_index("item")
    quantus = [i for i in same.index if i.startswith("Quantus")]
    assert len(quantus) == 2, same.index  # RegionPerturbation and PixelFlipping ran ('bench' extra)
    checked = same.dropna(subset=["max_abs_diff"])
    assert set(checked.index) == {"naive loop", *quantus}
    assert (checked["max_abs_diff"] < 1e-5).all(), checked["max_abs_diff"]
    p = 64  # pb-vit-tiny: 8x8 patches, one per step
    assert same.loc["patchbench", "rows"] == same.loc["forward bound", "rows"] == 6 * (p - 1)
    assert same.loc["Quantus 0.6.0 RegionPerturbation", "rows"] == 6 * p
    assert (same.dropna(subset=["seconds"])["seconds"] > 0).all()


def test_report_and_files(speed_run):
    out, md, df = speed_run["out"], speed_run["markdown"], speed_run["rows"]
    assert {p.name for p in out.iterdir()} == {"speed.md", "speed.csv", "speed.json"}
    assert (out / "speed.md").read_text() == md
    written = pd.read_csv(out / "speed.csv")
    assert len(written) == len(df)
    assert "× forward bound" in md and "goal ≤ 1.2" in md and "goal ≥ 20×" in md
    ops = df[df["table"] == "operators"].set_index("item")
    assert set(ops.index) == {"mean", "drop"}
    assert set(df[df["table"] == "attribution"]["item"]) == {"random", "rollout", "diffmask"}
    mem = df[df["table"] == "memory"].iloc[0]
    assert mem["rows"] == DEFAULT_ROWS["cpu"] and mem["peak_rss"] > 0
    assert speed_run["context"]["packages"]["quantus"] == "0.6.0"
    assert speed_run["context"]["machine"]["cores"] >= 1


def test_cli_speed_with_a_budget(tmp_path, glyphs_model, capsys):
    code = main(["speed", "--n-images", "2", "--methods", "random", "--operators", "mean", "--repeats", "1",
                 "--no-quantus", "--memory-budget", "4MiB", "--out", str(tmp_path / "s"), "--quiet"])
    assert code == 0
    df = pd.read_csv(tmp_path / "s" / "speed.csv")
    mem = df[df["table"] == "memory"].iloc[0]
    assert mem["budget"] == 4 * 2**20 and mem["rows"] == 4 * 2**20 // mem["bytes_per_row"]
    assert "Quantus" not in set(df["item"])
