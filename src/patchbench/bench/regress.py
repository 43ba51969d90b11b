"""Regression check on faithfulness scores: a small deterministic run against a stored reference.

``results/reference/<config>.json`` holds the per-(dataset, operator, method, metric) mean
scores of a run of a shipped config (or a config file). :func:`regress` runs the config again (always
recomputing: stored chunks are not trusted here) and fails with a table of what moved more
than the tolerance; ``update=True`` accepts the new scores as the reference. The reference's
``unstable`` table names scores measured to flip between CPUs, with the measurement; they
are shown, not checked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from patchbench.bench.config import BenchConfig, read_config
from patchbench.bench.runner import run_benchmark
from patchbench.bench.tables import Cell, Table, markdown
from patchbench.metrics.scores import scores
from patchbench.utils import provenance, write_json

REFERENCE_DIR = Path("results/reference")
def tolerances() -> dict[str, float]:
    """Allowed |now - reference| per score, as each score declares it (``metrics/scores.py``):
    twice the largest shift measured when every model and explainer was retrained on another
    CPU; two runs on one machine are byte-identical. See docs/regression.md."""
    return {s.name: s.tolerance for s in scores()}


def score_kind(key: str) -> str:
    """``glyphs/mean/rollout/deletion_kl_auc`` -> ``kl_auc``: the kind that references written
    before per-score tolerances (issue 14) keyed their tolerance by."""
    metric = key.rsplit("/", 1)[-1]
    for kind in ("kl_auc", "prob_auc"):
        if metric.endswith(kind):
            return kind
    return metric


class RegressionError(AssertionError):
    """Scores moved beyond the tolerance; the message holds the table of what moved."""


def reference_scores(scores: pd.DataFrame) -> dict[str, float]:
    """Mean score per ``dataset/operator/method/metric`` (operator ``-`` for AUROC)."""
    means = scores.groupby(["dataset", "operator", "method", "metric"], sort=True)["value"].mean()
    return {"/".join(k): round(float(v), 6) for k, v in means.items()}


def compare(reference: dict[str, float], current: dict[str, float],
            tolerance: dict[str, float], unstable: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Every score with its reference, difference, allowed difference and verdict.

    A score is ``moved`` when ``|now - ref|`` exceeds its tolerance (by score name, or by
    :func:`score_kind` in older references); a score only in one of the two is ``missing`` or
    ``new``; a score with no tolerance allows 0. A score named in ``unstable`` (score -> the
    measurement that showed it flips between machines) is reported as ``unstable`` and never
    fails the check.
    """
    unstable = unstable or {}
    rows = []
    for key in sorted(set(reference) | set(current)):
        ref, now = reference.get(key), current.get(key)
        if ref is None or now is None:
            rows.append({"score": key, "reference": ref, "now": now, "diff": None, "allowed": None,
                         "status": "new" if ref is None else "missing"})
            continue
        metric = key.rsplit("/", 1)[-1]
        allowed = float(tolerance.get(metric, tolerance.get(score_kind(key), 0.0)))
        diff = now - ref
        status = "unstable" if key in unstable else "moved" if abs(diff) > allowed else "ok"
        rows.append({"score": key, "reference": ref, "now": now, "diff": diff, "allowed": allowed,
                     "status": status})
    return pd.DataFrame(rows)


def regress(config: str, reference_dir: str | Path = REFERENCE_DIR, update: bool = False,
            progress: bool = True, **overrides: Any) -> pd.DataFrame:
    """Runs ``config`` and compares it with its reference (or writes the reference).

    Args:
        config: A shipped config name or a path.
        reference_dir: Folder of the ``<config>.json`` references.
        update: Accept the scores of this run as the new reference.
        progress: Progress bars.
        **overrides: BenchConfig fields to override (tests use a temporary results dir).

    Returns:
        The comparison table (see :func:`compare`).

    Raises:
        RegressionError: Some score moved, appeared or disappeared.
        FileNotFoundError: No reference yet (run with ``update=True`` once).
    """
    values = {**read_config(config), **overrides, "overwrite": "always"}
    cfg = BenchConfig(**values)
    name = Path(config).stem
    path = Path(reference_dir) / f"{name}.json"
    if not update and not path.exists():  # say so before minutes of work, not after
        raise FileNotFoundError(f"no reference {path}; create it with `make regress-update` "
                                f"(patchbench regress --config {name} --update)")
    start = time.perf_counter()
    out = run_benchmark(cfg, progress=progress)
    if out["failures"]:
        raise RegressionError(f"{len(out['failures'])} method run(s) failed: {out['failures']}")
    current = reference_scores(out["scores"])
    if update:
        tolerance = tolerances()
        # the scores measured to flip between machines stay marked (written by hand, with why)
        unstable = json.loads(path.read_text()).get("unstable", {}) if path.exists() else {}
        write_json(path, {"config": name, "tolerance": tolerance, "scores": current,
                          "n_scores": len(current), "unstable": unstable,
                          "seconds": round(time.perf_counter() - start, 1),
                          **{k: v for k, v in provenance().items() if k in ("git_commit", "packages")}})
        return compare(current, current, tolerance, unstable)
    ref = json.loads(path.read_text())
    tolerance = ref.get("tolerance", tolerances())
    table = compare(ref["scores"], current, tolerance, ref.get("unstable"))
    bad = table[~table.status.isin(["ok", "unstable"])]
    if len(bad):
        raise RegressionError(
            f"{len(bad)} of {len(table)} scores of config {name!r} differ from {path} beyond the "
            f"tolerance ({', '.join(f'{k} {v}' for k, v in tolerance.items())}):\n\n"
            + render(bad) + "\n\nIf the change is intended: make regress-update")
    return table


def render(table: pd.DataFrame) -> str:
    """The comparison rows as a Markdown table (no title)."""
    rows = [[r.score, Cell(r.reference, ".4f"), Cell(r.now, ".4f"), Cell(r.diff, "+.4f"),
             Cell(r.allowed, ".4f"), r.status] for r in table.itertuples()]
    header = ["score", "reference", "now", "diff", "allowed", "status"]
    return markdown(Table("", header, rows), heading=None).rstrip("\n")
