"""Robustness of a benchmark run: failing methods, stored chunks (reuse, damage, kill and resume),
and the regression check on faithfulness scores."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from patchbench.bench import BenchConfig, run_benchmark
from patchbench.bench.chunks import ChunkStore, MissingChunkError, checksum
from patchbench.bench.regress import (
    RegressionError,
    compare,
    reference_scores,
    regress,
    tolerances,
)
from patchbench.cli import main
from patchbench.methods import METHODS
from patchbench.methods.attention import AttentionRollout
from patchbench.methods.base import Method

TINY = dict(datasets=("glyphs",), operators=("mean",), n_images=6, steps=2)
SMALL = dict(datasets=("glyphs",), methods=("random", "attention", "rollout"),
             operators=("mean", "drop"), n_images=8, steps=3)
# methods x (maps + one curves chunk per operator), the ground-truth mask's curves per
# operator (the metric check) and one chunk for the model-randomisation check
N_SMALL_CHUNKS = 3 * (1 + 2) + 2 + 1


def chunk_names(results_dir: Path) -> list[str]:
    """Stored chunks: ``<kind>-<hash>.pt``; temporary files of interrupted writes start with '.'."""
    root = Path(results_dir) / ".chunks"
    return sorted(p.name for p in root.glob("*.pt") if not p.name.startswith(".")) if root.exists() else []


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith("."))


def read_run(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "run.json").read_text())


@pytest.fixture
def fake_methods():
    """Registers 'boom' (raises) and 'nanny' (NaN maps); the registry is restored afterwards."""
    saved = dict(METHODS._entries)

    class Boom(Method):
        name = "boom"

        def _attribute(self, images, target):
            raise RuntimeError("kaput")

    class Nanny(Method):
        name = "nanny"

        def _attribute(self, images, target):
            return torch.full((images.shape[0], *self.adapter.grid), float("nan"))

    METHODS.register("boom")(Boom)
    METHODS.register("nanny")(Nanny)
    yield
    METHODS._entries.clear()
    METHODS._entries.update(saved)


# ---------------------------------------------------------------- 1. per-method isolation


def test_failing_methods_are_isolated(tmp_path, glyphs_model, one_thread, fake_methods):
    cfg = BenchConfig(run="iso", results_dir=str(tmp_path), methods=("random", "boom", "nanny", "rollout"),
                      **TINY)
    out = run_benchmark(cfg, progress=False)
    failures = {f["method"]: f for f in out["failures"]}
    assert set(failures) == {"boom", "nanny"}
    assert failures["boom"]["error"] == "RuntimeError: kaput"
    assert "NaN" in failures["nanny"]["error"] and failures["nanny"]["dataset"] == "glyphs"
    run_dir = tmp_path / "iso"
    scores = pd.read_csv(run_dir / "scores.csv")
    assert set(scores.method) == {"random", "rollout"}
    assert len(scores) == 6 * 2 * (16 + 3)  # two methods, 16 curve scores under one operator + 3 localisation
    failed = pd.read_csv(run_dir / "failures.csv")
    assert list(failed.columns) == ["dataset", "method", "error"]
    assert set(failed.method) == {"boom", "nanny"}
    md = (run_dir / "leaderboard.md").read_text()
    assert "| boom | failed: RuntimeError: kaput |" in md
    assert "| nanny | failed: MethodOutputError:" in md
    assert "| rollout | " in md and "| random | " in md
    board = pd.read_csv(run_dir / "leaderboard.csv")
    assert set(board.method) == {"random", "rollout"}
    run = read_run(run_dir)
    assert {f["method"] for f in run["failures"]} == {"boom", "nanny"}
    assert any("'boom' failed" in w and "kaput" in w for w in run["warnings"])
    # the failed methods stored nothing: maps + one curves chunk for each of the two others,
    # the ground-truth mask's curves and the sanity check of the two
    assert len(chunk_names(tmp_path)) == run["chunks"]["computed"] == 4 + 1 + 1


def test_cli_exits_1_when_a_method_failed_and_keeps_the_others(tmp_path, glyphs_model, one_thread,
                                                               fake_methods, capsys):
    code = main(["bench", "--run", "cli", "--results-dir", str(tmp_path), "--datasets", "glyphs",
                 "--methods", "random,boom", "--operators", "mean", "--n-images", "6", "--steps", "2",
                 "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "1 method run(s) failed: boom (glyphs)" in err and "RuntimeError: kaput" in err
    assert {"scores.csv", "failures.csv", "run.json", "leaderboard.md"} <= set(visible(tmp_path / "cli"))
    assert set(pd.read_csv(tmp_path / "cli" / "scores.csv").method) == {"random"}


def test_all_methods_failing_still_writes_the_run(tmp_path, glyphs_model, one_thread, fake_methods):
    cfg = BenchConfig(run="none", results_dir=str(tmp_path), methods=("boom", "nanny"), **TINY)
    out = run_benchmark(cfg, progress=False)
    assert len(out["failures"]) == 2 and out["scores"].empty
    run_dir = tmp_path / "none"
    assert {"run.json", "failures.csv", "scores.csv", "leaderboard.md"} <= set(visible(run_dir))
    assert set(pd.read_csv(run_dir / "failures.csv").method) == {"boom", "nanny"}
    assert len(read_run(run_dir)["failures"]) == 2
    md = (run_dir / "leaderboard.md").read_text()
    assert "`boom`: failed: RuntimeError: kaput" in md and "`nanny`: failed: MethodOutputError" in md
    assert chunk_names(tmp_path) == []


# ---------------------------------------------------------------- 2. stored chunks are reused


@pytest.fixture(scope="module")
def stored(tmp_path_factory, glyphs_model, one_thread):
    """One SMALL run; tests work on copies of its results folder."""
    root = tmp_path_factory.mktemp("stored")
    out = run_benchmark(BenchConfig(run="first", results_dir=str(root), **SMALL), progress=False)
    assert out["run"]["chunks"]["computed"] == N_SMALL_CHUNKS and out["run"]["chunks"]["reused"] == 0
    return root


def copy_results(stored: Path, tmp_path: Path) -> Path:
    root = tmp_path / "results"
    shutil.copytree(stored, root)
    return root


def same_bytes(a: Path, b: Path, names=("scores.csv", "leaderboard.csv")) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert gzip.decompress((a / "curves.csv.gz").read_bytes()) == \
        gzip.decompress((b / "curves.csv.gz").read_bytes())


def test_second_run_reuses_every_chunk(stored, tmp_path, one_thread):
    root = copy_results(stored, tmp_path)
    before = {n: (root / ".chunks" / n).stat().st_mtime_ns for n in chunk_names(root)}
    out = run_benchmark(BenchConfig(run="second", results_dir=str(root), **SMALL), progress=False)
    assert out["run"]["chunks"]["computed"] == 0
    assert out["run"]["chunks"]["reused"] == N_SMALL_CHUNKS
    assert read_run(root / "second")["chunks"]["reused"] == N_SMALL_CHUNKS
    assert out["run"]["warnings"] == []
    same_bytes(root / "first", root / "second")
    assert {n: (root / ".chunks" / n).stat().st_mtime_ns for n in chunk_names(root)} == before


def test_overwrite_always_recomputes_everything(stored, tmp_path, one_thread):
    root = copy_results(stored, tmp_path)
    out = run_benchmark(BenchConfig(run="again", results_dir=str(root), overwrite="always", **SMALL),
                        progress=False)
    assert out["run"]["chunks"]["computed"] == N_SMALL_CHUNKS
    assert out["run"]["chunks"]["reused"] == 0
    assert len(chunk_names(root)) == N_SMALL_CHUNKS  # rewritten in place, same keys
    same_bytes(root / "first", root / "again")


def test_overwrite_never_fails_on_a_missing_chunk_and_writes_nothing(stored, tmp_path, one_thread,
                                                                     capsys):
    root = copy_results(stored, tmp_path)
    stored_chunks = chunk_names(root)
    # everything stored: renders the tables without computing
    out = run_benchmark(BenchConfig(run="render", results_dir=str(root), overwrite="never", **SMALL),
                        progress=False)
    assert out["run"]["chunks"] == {"root": str(root / ".chunks"), "reused": N_SMALL_CHUNKS,
                                    "computed": 0}
    same_bytes(root / "first", root / "render")
    # gradcam was never computed
    cfg = BenchConfig(run="nv", results_dir=str(root), overwrite="never",
                      **{**SMALL, "methods": ("random", "gradcam")})
    with pytest.raises(MissingChunkError, match="gradcam"):
        run_benchmark(cfg, progress=False)
    assert not (root / "nv").exists()
    assert visible(root) == ["first", "render"]
    assert sorted(p.name for p in root.iterdir()) == [".chunks", ".locks", "first", "render"]  # no staging
    assert chunk_names(root) == stored_chunks
    code = main(["bench", "--run", "nv", "--results-dir", str(root), "--datasets", "glyphs",
                 "--methods", "random,gradcam", "--operators", "mean,drop", "--n-images", "8",
                 "--steps", "3", "--overwrite", "never", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "patchbench: error: --overwrite never" in err and "gradcam" in err
    assert not (root / "nv").exists() and chunk_names(root) == stored_chunks


# ---------------------------------------------------------------- 3. damaged chunks


def test_damaged_chunks_are_reported_and_recomputed(stored, tmp_path, one_thread):
    root = copy_results(stored, tmp_path)
    chunks = root / ".chunks"
    objs = {n: torch.load(chunks / n, weights_only=True) for n in chunk_names(root)}

    def named(kind, method):
        return next(n for n, o in objs.items() if o["key"]["kind"] == kind
                    and o["key"]["method"]["name"] == method)

    truncated, flipped, tampered, swapped = (named("curves", "attention"), named("maps", "rollout"),
                                             named("maps", "attention"), named("curves", "random"))
    # 1. cut in half, as a full disk or a copy that stopped would leave it
    data = (chunks / truncated).read_bytes()
    (chunks / truncated).write_bytes(data[:len(data) // 2])
    # 2. bit rot inside the stored maps
    data = bytearray((chunks / flipped).read_bytes())
    raw = objs[flipped]["payload"]["maps"].numpy().tobytes()
    at = bytes(data).find(raw)
    assert at > 0
    for i in range(at + 8, at + 24):
        data[i] ^= 0xFF
    (chunks / flipped).write_bytes(bytes(data))
    # 3. a valid file whose maps changed but whose checksum is the old one
    obj = objs[tampered]
    payload = {**obj["payload"], "maps": obj["payload"]["maps"].flip(-1).contiguous()}
    assert checksum(payload) != obj["checksum"]
    torch.save({**obj, "payload": payload}, chunks / tampered)
    # 4. a valid chunk stored under another chunk's name
    other = named("curves", "rollout")
    shutil.copyfile(chunks / other, chunks / swapped)

    out = run_benchmark(BenchConfig(run="healed", results_dir=str(root), **SMALL), progress=False)
    run = read_run(root / "healed")
    warnings = run["warnings"]
    for name in (truncated, flipped, tampered, swapped):
        assert sum(name in w for w in warnings) == 1, (name, warnings)
    assert any(truncated in w and "unreadable" in w for w in warnings)
    assert any(tampered in w and "does not match its key or checksum" in w for w in warnings)
    assert any(swapped in w and "does not match its key or checksum" in w for w in warnings)
    assert len(warnings) == 4
    assert run["chunks"]["computed"] == 4 and run["chunks"]["reused"] == N_SMALL_CHUNKS - 4
    assert out["failures"] == []
    same_bytes(root / "first", root / "healed")
    # the damaged files were replaced by good ones
    again = run_benchmark(BenchConfig(run="third", results_dir=str(root), **SMALL), progress=False)
    assert again["run"]["chunks"]["computed"] == 0 and again["run"]["warnings"] == []


def test_store_rejects_a_bad_overwrite_mode(tmp_path):
    with pytest.raises(ValueError, match="never, missing, always"):
        ChunkStore(tmp_path, overwrite="sometimes")


# ---------------------------------------------------------------- 4. SIGKILL, then resume

KILL_METHODS = "random,attention,rollout,gradcam,integrated_gradients"
KILL_OPERATORS = "mean,drop"
KILL_TOTAL = 5 * (1 + 2) + 2 + 1  # methods x (maps + curves per operator), metric check, sanity
KILL_AFTER = 4  # chunks stored when the run is killed


def bench_command(results_dir: Path) -> list[str]:
    return [sys.executable, "-m", "patchbench", "bench", "--run", "k", "--results-dir", str(results_dir),
            "--datasets", "glyphs", "--methods", KILL_METHODS, "--operators", KILL_OPERATORS,
            "--n-images", "30", "--steps", "6", "--quiet"]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # as `one_thread`


def test_killed_run_resumes_from_its_chunks(tmp_path, glyphs_model, one_thread):
    r0, r = tmp_path / "reference", tmp_path / "killed"
    # the uninterrupted reference: same settings, in this process, alongside the killed run
    cfg = BenchConfig(run="k", results_dir=str(r0), datasets=("glyphs",),
                      methods=tuple(KILL_METHODS.split(",")), operators=tuple(KILL_OPERATORS.split(",")),
                      n_images=30, steps=6)
    reference = {}

    def run_reference():
        try:
            reference["out"] = run_benchmark(cfg, progress=False)
        except BaseException as e:  # re-raised in the test's thread
            reference["error"] = e

    log = tmp_path / "killed.log"
    with open(log, "wb") as f:
        victim = subprocess.Popen(bench_command(r), stdout=f, stderr=subprocess.STDOUT, env=ONE_THREAD)
    thread = threading.Thread(target=run_reference, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while len(chunk_names(r)) < KILL_AFTER:
            assert victim.poll() is None, (
                f"the run ended (rc {victim.returncode}) before {KILL_AFTER} chunks were stored: "
                f"{log.read_text()[-2000:]}")
            assert time.monotonic() < deadline, f"no {KILL_AFTER} chunks after 120 s: {chunk_names(r)}"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL  # killed, not finished
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        thread.join(timeout=300)  # one run at a time in this process (global RNG, pyplot)

    present = chunk_names(r)
    assert KILL_AFTER <= len(present) < KILL_TOTAL  # the kill came mid-run
    assert not (r / "k").exists()  # no half-written run folder...
    assert visible(r) == []  # ...nor any other file
    # an interrupted write leaves at most a hidden temporary file, which is never a chunk
    leftovers = [p.name for p in (r / ".chunks").iterdir() if p.name.startswith(".")]
    assert all(n.endswith(".tmp") for n in leftovers)
    fake = r / ".chunks" / f".{present[0]}.x1y2z3.tmp"
    fake.write_bytes(b"half a chunk")
    assert len(chunk_names(r)) == len(present)

    assert not thread.is_alive()
    if "error" in reference:
        raise reference["error"]
    # the same command again, run to completion (in this process: it saves starting Python again)
    assert main(bench_command(r)[3:]) == 0

    run = read_run(r / "k")
    assert run["chunks"]["reused"] == len(present)
    assert run["chunks"]["computed"] == KILL_TOTAL - len(present)
    assert run["warnings"] == [] and run["failures"] == []
    assert read_run(r0 / "k")["chunks"] == {"root": str(r0 / ".chunks"), "reused": 0,
                                            "computed": KILL_TOTAL}
    assert len(chunk_names(r)) == len(chunk_names(r0)) == KILL_TOTAL
    assert set(present) <= set(chunk_names(r0))  # same keys in both stores
    same_bytes(r0 / "k", r / "k")
    assert fake.read_bytes() == b"half a chunk"  # ignored, not read as a chunk


# ---------------------------------------------------------------- 5. regression check

REGRESS_TOML = """\
run = "tiny-regress"
model = "pb-vit-tiny"
datasets = ["glyphs"]
methods = ["random", "rollout"]
operators = ["mean"]
n_images = 20
steps = 4
seed = 0
device = "cpu"
results_dir = {results_dir}
"""


@pytest.fixture
def tiny_config(tmp_path):
    results = tmp_path / "results"
    path = tmp_path / "tiny.toml"
    path.write_text(REGRESS_TOML.format(results_dir=json.dumps(str(results))))
    return path, results, tmp_path / "reference"


def shuffled_rollout(monkeypatch):
    """Rollout with each image's map scrambled by a fixed permutation."""
    original = AttentionRollout._attribute

    def scrambled(self, images, target):
        maps = original(self, images, target)
        g = torch.Generator().manual_seed(1234)
        flat = maps.flatten(1)
        out = torch.stack([row[torch.randperm(row.numel(), generator=g)] for row in flat])
        return out.view_as(maps)

    monkeypatch.setattr(AttentionRollout, "_attribute", scrambled)


def test_regression_trips_on_a_degraded_method(tiny_config, glyphs_model, one_thread, monkeypatch,
                                               capsys):
    config, results, refs = tiny_config
    kw = dict(progress=False, results_dir=str(results))
    with pytest.raises(FileNotFoundError, match="regress-update"):
        regress(str(config), refs, **kw)
    assert not (refs / "tiny.json").exists()

    table = regress(str(config), refs, update=True, **kw)
    saved = json.loads((refs / "tiny.json").read_text())
    assert saved["config"] == "tiny" and saved["tolerance"] == tolerances()
    assert saved["n_scores"] == len(saved["scores"]) == len(table) == 2 * (16 + 3)
    assert "glyphs/mean/rollout/srg" in saved["scores"] and "glyphs/-/random/auroc" in saved["scores"]
    assert (table.status == "ok").all()

    table = regress(str(config), refs, **kw)  # recomputed from scratch: identical scores
    assert (table.status == "ok").all() and (table["diff"] == 0).all()
    assert len(table) == len(saved["scores"])

    shuffled_rollout(monkeypatch)
    with pytest.raises(RegressionError) as err:
        regress(str(config), refs, **kw)
    message = str(err.value)
    assert "| score | reference | now | diff | allowed | status |" in message
    rows = [line for line in message.splitlines() if line.startswith("| glyphs/")]
    assert rows and all("/rollout/" in line and line.endswith("| moved |") for line in rows)
    assert any("/rollout/srg " in line for line in rows)
    assert "/random/" not in message
    assert json.loads((refs / "tiny.json").read_text()) == saved  # the reference is untouched

    assert main(["regress", "--config", str(config), "--reference-dir", str(refs), "--quiet"]) == 1
    err_text = capsys.readouterr().err
    assert "patchbench: regression:" in err_text and "/rollout/srg" in err_text
    assert (results / "tiny-regress" / "run.json").exists()  # results_dir came from the TOML

    # scores marked unstable in the reference are shown, not checked, and an update keeps the marks
    moved = [line.split(" | ")[0].lstrip("| ") for line in rows]
    (refs / "tiny.json").write_text(json.dumps({**saved, "unstable": {k: "flips" for k in moved}}))
    table = regress(str(config), refs, **kw).set_index("score")
    assert set(table.loc[moved, "status"]) == {"unstable"}
    assert set(table.drop(index=moved).status) == {"ok"}
    regress(str(config), refs, update=True, **kw)
    assert json.loads((refs / "tiny.json").read_text())["unstable"] == {k: "flips" for k in moved}


def test_reference_without_tolerance_uses_the_default(tiny_config, glyphs_model, one_thread):
    config, results, refs = tiny_config
    refs.mkdir()
    (refs / "tiny.json").write_text(json.dumps({"config": "tiny", "scores": {}}))
    with pytest.raises(RegressionError) as err:
        regress(str(config), refs, progress=False, results_dir=str(results))
    message = str(err.value)
    assert all(f"{name} {allowed}" in message for name, allowed in tolerances().items())
    rows = [line for line in message.splitlines() if line.startswith("| glyphs/")]
    assert len(rows) == 2 * (16 + 3) and all(line.endswith("| new |") for line in rows)


def test_compare_verdicts():
    tol = {"srg": 0.1, "auroc": 0.05, "prob_auc": 0.05, "kl_auc": 0.5}
    ref = {"g/mean/m/srg": 0.5, "g/mean/m/deletion_prob_auc": 0.3, "g/-/m/auroc": 0.8,
           "g/mean/m/lerf_kl_auc": 4.0, "g/mean/m/insertion_prob_auc": 0.9, "g/mean/m/other": 1.0,
           "g/drop/m/other": 1.0, "g/mean/gone/srg": 0.2}
    now = {"g/mean/m/srg": 0.42, "g/mean/m/deletion_prob_auc": 0.36, "g/-/m/auroc": 0.77,
           "g/mean/m/lerf_kl_auc": 4.6, "g/mean/m/insertion_prob_auc": 0.92, "g/mean/m/other": 1.0,
           "g/drop/m/other": 1.0001, "g/mean/fresh/srg": 0.1}
    table = compare(ref, now, tol).set_index("score")
    assert table.status.to_dict() == {
        "g/mean/m/srg": "ok", "g/mean/m/deletion_prob_auc": "moved", "g/-/m/auroc": "ok",
        "g/mean/m/lerf_kl_auc": "moved", "g/mean/m/insertion_prob_auc": "ok",
        "g/mean/m/other": "ok", "g/drop/m/other": "moved",  # no tolerance for its kind: exact
        "g/mean/gone/srg": "missing", "g/mean/fresh/srg": "new"}
    assert table.loc["g/mean/m/lerf_kl_auc", "allowed"] == 0.5
    assert table.loc["g/mean/m/deletion_prob_auc", "allowed"] == 0.05
    assert table.loc["g/mean/m/srg", "diff"] == pytest.approx(-0.08)
    fresh, gone = table.loc["g/mean/fresh/srg"], table.loc["g/mean/gone/srg"]
    assert pd.isna(fresh["reference"]) and pd.isna(fresh["diff"]) and fresh["now"] == 0.1
    assert pd.isna(gone["now"]) and pd.isna(gone["allowed"]) and gone["reference"] == 0.2
    assert set(compare(ref, ref, tol).status) == {"ok"}
    marked = compare(ref, now, tol, {"g/mean/m/deletion_prob_auc": "flips"}).set_index("score")
    assert marked.loc["g/mean/m/deletion_prob_auc", "status"] == "unstable"
    assert (marked.drop(index="g/mean/m/deletion_prob_auc").status == table.drop(
        index="g/mean/m/deletion_prob_auc").status).all()
    assert list(compare(ref, now, tol).score) == sorted(set(ref) | set(now))
    # per-score tolerances (references written since issue 14) take precedence over kinds
    per_score = compare(ref, now, {**tol, "deletion_prob_auc": 0.1}).set_index("score")
    assert per_score.loc["g/mean/m/deletion_prob_auc", "status"] == "ok"
    from patchbench.metrics.scores import scores

    assert set(tolerances()) == {s.name for s in scores()} and all(v > 0 for v in tolerances().values())


def test_reference_scores_are_means_per_key():
    scores = pd.DataFrame({"dataset": "glyphs", "operator": ["mean", "mean", "-"],
                           "method": "rollout", "metric": ["srg", "srg", "auroc"],
                           "value": [0.1, 0.2, 0.7]})
    assert reference_scores(scores) == {"glyphs/-/rollout/auroc": 0.7, "glyphs/mean/rollout/srg": 0.15}
