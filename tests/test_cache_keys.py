"""Narrow, honest chunk keys: a stored result is recomputed when what it depends on changes,
and only then (editing the report keeps every chunk; editing a method's file recomputes it)."""

from pathlib import Path

import pytest

from patchbench.bench import BenchConfig, run_benchmark

CFG = dict(datasets=("glyphs",), methods=("random", "rollout"), operators=("mean",), n_images=6,
           steps=2, sanity_images=4, gallery_size=0)
# maps and curves of 2 methods, the ground-truth mask's curves, the sanity check
N_CHUNKS = 2 * 2 + 1 + 1


def edit(monkeypatch, name: str) -> None:
    """Every read of patchbench's ``name`` now sees an edited file, as after a real edit."""
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        data = real(self)
        return data + b"\n# edited\n" if self.name == name and "patchbench" in self.parts else data

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


@pytest.mark.parametrize("name,recomputed", [
    ("report.py", 0), ("results.py", 0), ("cli.py", 0), ("stats.py", 0), ("speed.py", 0),
    ("attention.py", 3),  # rollout's maps and curves, and the sanity check of both methods
    ("removal.py", 3),  # the operator: every curves chunk (two methods and the mask)
    ("faithfulness.py", 3),  # the harness: likewise
    ("adapter.py", N_CHUNKS),  # the model itself: everything
])
def test_an_edit_recomputes_exactly_what_depends_on_it(name, recomputed, tmp_path, monkeypatch,
                                                       glyphs_model, one_thread):
    cfg = BenchConfig(run="k", results_dir=str(tmp_path), **CFG)
    first = run_benchmark(cfg, progress=False)["run"]["chunks"]
    assert first["computed"] == N_CHUNKS and first["reused"] == 0
    edit(monkeypatch, name)
    again = run_benchmark(cfg, progress=False)["run"]["chunks"]
    assert again["computed"] == recomputed and again["reused"] == N_CHUNKS - recomputed
