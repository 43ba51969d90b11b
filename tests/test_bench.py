"""End-to-end runs: files, determinism, tables, atomic writes, command line."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from patchbench.bench import BenchConfig, run_benchmark, select_samples
from patchbench.bench.results import write_run
from patchbench.cli import main

SMALL = dict(datasets=("glyphs",), methods=("random", "attention", "rollout"),
             operators=("mean", "drop"), n_images=12, steps=4)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, glyphs_model):
    root = tmp_path_factory.mktemp("results")
    a = run_benchmark(BenchConfig(run="a", results_dir=str(root), **SMALL), progress=False)
    # recomputed, not read back from a's stored chunks: the determinism check must mean something
    b = run_benchmark(BenchConfig(run="b", results_dir=str(root), overwrite="always", **SMALL),
                      progress=False)
    return root, a, b


def test_run_writes_all_files(two_runs):
    root, a, b = two_runs
    names = {p.name for p in (root / "a").iterdir()}
    assert names == {"scores.csv", "curves.csv.gz", "leaderboard.csv", "leaderboard.md",
                     "curves.png", "run.json", "report.html", "metric_check.csv", "sanity.csv",
                     "rank_stability.csv"}
    # no staging left; only the stored result chunks
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == [".chunks", ".locks"]
    assert b["run"]["chunks"]["reused"] == 0 and b["run"]["chunks"]["computed"] > 0
    scores = pd.read_csv(root / "a" / "scores.csv")
    assert list(scores.columns) == ["model", "dataset", "method", "operator", "metric",
                                    "sample_id", "value"]
    # one row per image per metric: 3 methods x (16 scores x 2 operators + 3 localisation scores)
    assert len(scores) == 12 * 3 * (16 * 2 + 3)
    assert scores.groupby(["method", "operator", "metric"]).size().eq(12).all()
    curves = pd.read_csv(root / "a" / "curves.csv.gz")
    assert set(curves.curve) == {"deletion", "insertion", "lerf"}
    assert sorted(curves.x.unique().tolist()) == [0, 0.25, 0.5, 0.75, 1]
    run = json.loads((root / "a" / "run.json").read_text())
    assert run["config"]["n_images"] == 12 and run["seeds"]["run"] == 0
    assert run["packages"]["torch"] and run["packages"]["timm"]
    assert "git_commit" in run and len(run["sample_ids"]["glyphs"]) == 12
    assert run["models"]["glyphs"]["test_accuracy"] >= 0.98


def test_two_runs_give_identical_scores(two_runs):
    root, _, _ = two_runs
    assert (root / "a" / "scores.csv").read_bytes() == (root / "b" / "scores.csv").read_bytes()
    assert (root / "a" / "leaderboard.csv").read_bytes() == (root / "b" / "leaderboard.csv").read_bytes()


def test_leaderboard_sorted_by_main_score_with_arrows(two_runs):
    root, a, _ = two_runs
    md = (root / "a" / "leaderboard.md").read_text()
    assert "SRG ↑" in md and "Del p ↓" in md and "LeRF KL ↓" in md and "AUROC ↑" in md
    assert "Point ↑" in md and "Mass ↑" in md and "ground-truth localisation" in md
    board = pd.read_csv(root / "a" / "leaderboard.csv")
    for op, group in board.groupby("operator"):
        assert set(group.method) == {"random", "attention", "rollout"} and (group.n == 12).all()
        main = "auroc" if op == "-" else "srg"
        assert group[main].is_monotonic_decreasing
        assert (group[f"{main}_ci_low"] < group[main]).all()
        assert (group[main] < group[f"{main}_ci_high"]).all()
        assert group[f"{main}_verdict"].iloc[0] == "best"
        assert set(group[f"{main}_verdict"].iloc[1:]) <= {"tie", "worse"}
    # the mean in the table is the mean of the per-image rows
    s = a["scores"]
    want = s[(s.method == "rollout") & (s.operator == "drop") & (s.metric == "srg")].value.mean()
    got = board[(board.method == "rollout") & (board.operator == "drop")].srg.item()
    assert got == pytest.approx(want, rel=1e-5)


def test_run_checks_itself_and_writes_a_report(two_runs):
    root, a, _ = two_runs
    sanity = pd.read_csv(root / "a" / "sanity.csv")
    verdicts = sanity.drop_duplicates("method").set_index("method").verdict
    # random maps depend on the image only: unchanged by randomising the model
    assert verdicts["random"] == "fail" and verdicts["attention"] == "pass"
    assert (sanity[sanity.method == "random"].spearman == 1).all()
    assert sanity.stage.iloc[0] == "head" and sanity.stage.iloc[-1] == "embedding"
    check = pd.read_csv(root / "a" / "metric_check.csv")
    assert set(check.operator) == {"mean", "drop"} and set(check.verdict) <= {"pass", "flag"}
    # the mask beats random by a wide margin on deletion: a metric that works here
    assert (check[check.metric == "deletion_prob_auc"].verdict == "pass").all()
    stability = pd.read_csv(root / "a" / "rank_stability.csv")
    assert set(stability.operators) == {"mean vs drop"} and stability.tau.between(-1, 1).all()
    html = (root / "a" / "report.html").read_text()
    for needle in ("Leaderboards", "Gallery", "Sanity check", "Metric check", "Kendall", "Provenance"):
        assert needle in html
    # gallery: 8 images x (image + ground truth + 3 methods), the curves figure, the colour bar
    assert html.count('class="gallery-row"') == 8
    assert html.count("data:image/png;base64,") == 8 * 5 + 2


def test_failed_write_keeps_previous_run_and_leaves_nothing(tmp_path):
    run_dir = tmp_path / "r"
    marker = {"run.json": lambda p: p.write_text('{"patchbench_version": "0"}')}
    write_run(run_dir, {**marker, "a.txt": lambda p: p.write_text("old")})

    def broken(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_run(run_dir, {**marker, "a.txt": lambda p: p.write_text("new"), "b.txt": broken})
    assert (run_dir / "a.txt").read_text() == "old" and not (run_dir / "b.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", "r"]


def test_select_samples_is_stratified_and_seeded():
    labels = torch.tensor([0] * 90 + [1] * 5 + [2] * 5)
    ids = select_samples(labels, 9, seed=0)
    assert sorted(torch.bincount(labels[ids], minlength=3).tolist()) == [3, 3, 3]
    assert ids == select_samples(labels, 9, seed=0) and ids != select_samples(labels, 9, seed=1)
    assert len(set(select_samples(labels, 100, seed=0))) == 100


@pytest.mark.parametrize("args,needle", [
    (["bench", "--methods", "rolout"], "Did you mean 'rollout'"),
    (["bench", "--datasets", "cifar"], "Valid datasets: cifar10, glyphs, imagefolder, toy-count"),
    (["bench", "--operators", "blurr"], "Did you mean 'blur'"),
    (["bench", "--model", "vit-b"], "Valid models: pb-vit-tiny"),
    (["bench", "--methods", "nothing*"], "no method matches"),
])
def test_unknown_names_list_valid_ones(args, needle, capsys, tmp_path):
    assert main([*args, "--results-dir", str(tmp_path)]) == 2
    assert needle in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_help_on_every_subcommand():
    for cmd in ([], ["bench"], ["train"], ["list"]):
        out = subprocess.run([sys.executable, "-m", "patchbench", *cmd, "--help"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "usage: patchbench" in out.stdout


def test_list_command(capsys):
    assert main(["list", "methods", "*grad*"]) == 0
    out = capsys.readouterr().out
    assert "gradcam" in out and "integrated_gradients" in out and "rollout" not in out


def test_diffmask_in_a_run_with_placeholder_operator(tmp_path, glyphs_model):
    cfg = BenchConfig(run="dm", results_dir=str(tmp_path), datasets=("glyphs",),
                      methods=("random", "diffmask"), operators=("mean", "placeholder"),
                      n_images=8, steps=4, sanity_images=4, sanity_train_steps=5,
                      diffmask_config={"steps": 10, "batch_size": 8})
    out = run_benchmark(cfg, progress=False)
    scores = out["scores"]
    # the sanity check retrains DiffMask for each model it explains, and says so
    sanity = out["sanity"].drop_duplicates("method").set_index("method")
    assert sanity.verdict["diffmask"] in ("pass", "fail") and sanity.verdict["random"] == "fail"
    assert sanity.retrained["diffmask"] == "5 steps, against mean" and sanity.retrained["random"] == ""
    assert "| diffmask | 5 steps, against mean |" in (tmp_path / "dm" / "leaderboard.md").read_text()
    # one explainer per operator, each trained against that operator's removal: their
    # localisation rows are told apart, their faithfulness rows are each under their own operator
    assert set(scores[scores.operator != "-"].method) == {"random", "diffmask"}
    assert set(scores[scores.operator == "-"].method) == {"random", "diffmask[mean]", "diffmask[placeholder]"}
    assert set(scores.operator) == {"mean", "placeholder", "-"}
    for removal in ("mean", "placeholder"):
        log = pd.read_csv(tmp_path / "dm" / f"diffmask_train_glyphs_{removal}.csv")
        assert len(log) == 10 and {"kl", "kept", "kept_truth", "kept_other", "saturated", "lambda_0",
                                   "lambda_5"} <= set(log.columns)
    run = json.loads((tmp_path / "dm" / "run.json").read_text())
    explainers = run["models"]["glyphs"]["diffmask"]
    assert explainers["mean"]["removal"]["name"] == "mean"
    assert explainers["placeholder"]["removal"] == {"name": "placeholder (learned)"}
    assert explainers["mean"]["checkpoint"] != explainers["placeholder"]["checkpoint"]
    assert explainers["mean"]["config"]["steps"] == 10 and explainers["mean"]["train_seconds"] > 0
    transfer = pd.read_csv(tmp_path / "dm" / "transfer.csv")  # each scored under the other operator
    pairs = set(zip(transfer.trained_for, transfer.operator))
    assert pairs == {("mean", "placeholder"), ("placeholder", "mean")}
    assert "Trained for X, scored under Y" in (tmp_path / "dm" / "leaderboard.md").read_text()


def test_diffmask_trained_from_several_seeds(tmp_path, glyphs_model):
    cfg = BenchConfig(run="seeds", results_dir=str(tmp_path), datasets=("glyphs",),
                      methods=("random", "diffmask"), operators=("drop",), n_images=8, steps=4,
                      sanity_images=0, train_seeds=2, diffmask_config={"steps": 10, "batch_size": 8})
    out = run_benchmark(cfg, progress=False)
    folder = tmp_path / "seeds"
    per_seed = pd.read_csv(folder / "seed_scores.csv")
    assert set(per_seed.method) == {"diffmask"} and set(per_seed.train_seed) == {0, 1}
    keys = ["method", "operator", "metric", "sample_id"]
    seeds = per_seed.pivot_table(index=keys, columns="train_seed", values="value")
    assert (seeds[0] - seeds[1]).abs().max() > 1e-3  # two explainers, not one scored twice
    # the table's rows are the mean over the seeds, image by image
    scores = pd.read_csv(folder / "scores.csv").set_index(keys)
    joined = seeds.join(scores.value, how="inner")
    assert len(joined) == len(seeds)
    assert ((joined[0] + joined[1]) / 2 - joined.value).abs().max() < 1e-5
    run = json.loads((folder / "run.json").read_text())
    explainers = run["models"]["glyphs"]["diffmask"]
    assert explainers["drop"]["config"]["seed"] == 0 and explainers["drop, seed 1"]["config"]["seed"] == 1
    assert explainers["drop"]["checkpoint"] != explainers["drop, seed 1"]["checkpoint"]
    assert (folder / "diffmask_train_glyphs_drop_seed1.csv").exists()
    # the cost of the row is both trainings; the range over seeds sits beside the interval
    timing = out["timing"].set_index("method")
    total = explainers["drop"]["train_seconds"] + explainers["drop, seed 1"]["train_seconds"]
    assert timing.at["diffmask", "setup_seconds"] == pytest.approx(total)
    assert timing.at["diffmask", "seeds"] == 2
    summary = out["summary"].set_index(["method", "operator", "metric"])
    srg = summary.loc[("diffmask", "drop", "srg")]
    means = per_seed[per_seed.metric == "srg"].groupby("train_seed").value.mean()
    assert srg.seeds == 2
    assert (srg.seed_min, srg.seed_max) == pytest.approx((means.min(), means.max()))
    assert f"seeds 2: {means.min():.3f}–{means.max():.3f}" in (folder / "leaderboard.md").read_text()
    assert "seeds 2: " in (folder / "report.html").read_text()
