"""Scaling: chunk sizes from a memory budget give the same scores, and a run sharded over two
torchrun processes (gloo, CPU) writes the same results as one process."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from patchbench.bench.config import BenchConfig
from patchbench.bench.distributed import World
from patchbench.bench.runner import run_benchmark
from patchbench.memory import chunk_rows, format_bytes, parse_bytes, peak_rss, row_bytes

SMALL = dict(model="pb-vit-tiny", datasets=("glyphs",), methods=("random", "rollout", "gradcam"),
             operators=("mean", "drop"), n_images=13, steps=6, batch_size=5)


# ---- memory budget -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("512MiB", 512 * 2**20), ("2GB", 2 * 10**9),
                                            ("1.5GiB", 3 * 2**29), ("100", 100), ("64 kib", 65536)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", "-5MiB", ""])
def test_parse_bytes_names_the_units(bad):
    with pytest.raises(ValueError, match="MiB"):
        parse_bytes(bad)


def test_row_estimate_grows_with_the_model_and_leaves_no_hooks(tiny):
    from conftest import tiny_vit

    from patchbench.models import ViTAdapter

    big = ViTAdapter(tiny_vit(embed_dim=64, num_heads=4))
    x = torch.randn(2, 3, 16, 16)
    small_row, big_row = row_bytes(tiny, x), row_bytes(big, x)
    assert big_row > small_row > 3 * x[0].numel() * 4  # more than the pixel copies alone
    assert all(not m._forward_hooks for m in big.model.modules())
    # 2x width: the largest layer (MLP: 4x width) and the tokens double
    assert 1.5 < big_row / small_row < 4


def test_hooks_are_removed_when_the_forward_pass_fails(tiny):
    with pytest.raises(RuntimeError):
        row_bytes(tiny, torch.randn(1, 5, 16, 16))  # wrong channel count
    assert all(not m._forward_hooks for m in tiny.model.modules())


def test_chunk_rows_follow_the_budget(tiny):
    x = torch.randn(1, 3, 16, 16)
    per_row = row_bytes(tiny, x)
    assert chunk_rows(tiny, x, 10 * per_row) == 10
    assert chunk_rows(tiny, x, 10 * per_row, cap=4) == 4
    with pytest.raises(ValueError, match="less than one forward row"):
        chunk_rows(tiny, x, per_row - 1)


def test_peak_rss_is_read():
    assert peak_rss() > 10 * 2**20  # a Python process with torch loaded
    assert format_bytes(3 * 2**20) == "3.0 MiB"


def test_a_small_budget_gives_the_same_scores_as_a_large_one(tmp_path, glyphs_model):
    def run(budget: str, name: str) -> dict:
        cfg = BenchConfig(**SMALL, run=name, results_dir=str(tmp_path / name), memory_budget=budget,
                          chunk_size=100_000)
        return run_benchmark(cfg, progress=False)

    large, small = run("8GiB", "large"), run("2MiB", "small")
    chunks = (large["run"]["models"]["glyphs"]["chunk_size"], small["run"]["models"]["glyphs"]["chunk_size"])
    assert chunks[0] > 1000 and 1 <= chunks[1] <= 20, chunks  # really different passes
    a, b = large["scores"], small["scores"]
    assert a[["method", "operator", "metric", "sample_id"]].equals(b[["method", "operator", "metric",
                                                                       "sample_id"]])
    # groups of equal length in 'drop' differ with the chunk: float32 rounding, nothing more
    assert (a["value"] - b["value"]).abs().max() < 1e-5


def test_budget_is_validated():
    with pytest.raises(ValueError, match="memory size"):
        BenchConfig(memory_budget="much").validate()


# ---- sharding --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, size", [(13, 2), (2, 2), (10, 3), (7, 1)])
def test_shards_cover_every_image_once(n, size):
    parts = [World(r, size).shard(n) for r in range(size)]
    covered = [i for p in parts for i in range(n)[p]]
    assert covered == list(range(n))
    assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def _read(run_dir) -> dict[str, bytes]:
    out = {name: (run_dir / name).read_bytes() for name in ("scores.csv", "leaderboard.csv")}
    out["curves"] = gzip.decompress((run_dir / "curves.csv.gz").read_bytes())
    return out


def test_torchrun_with_two_cpu_processes_equals_one_process(tmp_path, glyphs_model):
    single = run_benchmark(BenchConfig(**SMALL, run="single", results_dir=str(tmp_path)), progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "patchbench", "bench", "--model", "pb-vit-tiny", "--datasets", "glyphs",
           "--methods", ",".join(SMALL["methods"]), "--operators", ",".join(SMALL["operators"]),
           "--n-images", str(SMALL["n_images"]), "--steps", str(SMALL["steps"]),
           "--batch-size", str(SMALL["batch_size"]), "--device", "cpu",
           "--results-dir", str(tmp_path), "--run-name", "sharded", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded_dir = tmp_path / "sharded"
    run = json.loads((sharded_dir / "run.json").read_text())
    assert run["world"]["ranks"] == 2
    assert run["sample_ids"] == single["run"]["sample_ids"]
    assert run["models"]["glyphs"]["eval_accuracy"] == single["run"]["models"]["glyphs"]["eval_accuracy"]
    # each rank stored its own chunks (7 and 6 images): none were shared with the single run;
    # both ranks score the ground-truth mask, rank 0 alone runs the sanity check
    n_ops = len(SMALL["operators"])
    assert run["chunks"]["computed"] == 2 * len(SMALL["methods"]) * (1 + n_ops) + 2 * n_ops + 1
    got, expected = _read(sharded_dir), _read(single["run_dir"])
    for name in expected:
        assert got[name] == expected[name], name
    timing = pd.DataFrame(run["timing"]["attribution_ms_per_image"])
    assert list(timing["method"]) == list(SMALL["methods"])


def test_a_method_failing_on_one_rank_is_dropped_from_every_rank():
    from patchbench.bench.runner import _merge

    cfg = BenchConfig(**SMALL)

    def part(ids, fail):
        rows = [{"model": "m", "dataset": "glyphs", "method": m, "operator": "mean", "metric": "srg",
                 "sample_id": i, "value": float(i)} for m in ("random", "rollout") for i in ids]
        timing = [{"dataset": "glyphs", "method": m, "ms_per_image": 2.0, "images": len(ids)}
                  for m in ("random", "rollout")]
        failures = [{"dataset": "glyphs", "method": "rollout", "error": "boom"}] if fail else []
        return {"scores": rows, "curves": [], "timing": timing, "failures": failures, "warnings": [],
                "chunks": [0, 0]}

    scores, _, timing, failures = _merge([part([3, 1], False), part([7], True)], cfg,
                                         {"glyphs": [7, 3, 1]})
    assert set(scores["method"]) == {"random"}
    assert list(scores["sample_id"]) == [7, 3, 1]  # the order of the selection, not of the ranks
    assert list(failures["method"]) == ["rollout"] and list(timing["method"]) == ["random"]
