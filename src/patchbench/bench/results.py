"""Tidy results -> leaderboard tables and curve plots, and the atomic run-folder writer."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from patchbench.metrics import MAIN_METRIC, METRICS

GROUP = ["dataset", "model", "operator"]
AUC_NOTE = ("AUCs: trapezoid rule over the fraction of patches removed/inserted in [0, 1], "
            "both ends included (independent of the number of steps). "
            "SRG = LeRF p AUC - deletion p AUC. Under one operator, LeRF and insertion are "
            "the same images seen from opposite ends, so their AUCs are equal; Ins is not "
            "shown separately. Cells: mean ± 95% CI half-width (Student t).")
TABLE_METRICS = ["srg", "deletion_prob_auc", "lerf_prob_auc", "deletion_kl_auc", "lerf_kl_auc",
                 "auroc"]


def summarise(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean, 95% CI half-width and n per (dataset, model, operator, method, metric).

    Operator-independent scores (operator ``"-"``, e.g. AUROC) are repeated under every
    operator so each table is complete.
    """
    free = scores[scores.operator == "-"]
    tied = scores[scores.operator != "-"]
    ops = tied[["dataset", "model", "operator"]].drop_duplicates()
    scores = pd.concat([tied, free.drop(columns="operator").merge(ops, on=["dataset", "model"])])
    g = scores.groupby([*GROUP, "method", "metric"], sort=False)["value"]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    t = out.n.map(lambda n: stats.t.ppf(0.975, n - 1) if n > 1 else math.nan)
    out["ci95"] = t * out["std"] / np.sqrt(out.n)
    out["higher_is_better"] = out.metric.map(lambda m: METRICS[m].higher_is_better)
    return out.drop(columns="std")


def _ordered(group: pd.DataFrame) -> list[str]:
    main = group[group.metric == MAIN_METRIC].set_index("method")["mean"]
    return main.sort_values(ascending=not METRICS[MAIN_METRIC].higher_is_better).index.tolist()


def render_markdown(summary: pd.DataFrame, timing: pd.DataFrame | None = None,
                    failures: pd.DataFrame | None = None) -> str:
    """Markdown leaderboards, one table per (dataset, model, operator), best first.

    Args:
        summary: From :func:`summarise`.
        timing: Optional ``dataset, method, ms_per_image`` attribution times.
        failures: Optional ``dataset, method, error`` rows, shown as ``failed: <reason>``
            lines in that dataset's tables (or on their own when nothing else was scored).
    """
    failures = failures if failures is not None else pd.DataFrame(columns=["dataset", "method", "error"])
    lines = []
    if summary.empty:
        for f in failures.itertuples():
            lines.append(f"- {f.dataset} · `{f.method}`: failed: {f.error}")
        return "\n".join([*lines, "", AUC_NOTE]) + "\n"
    for (dataset, model, op), group in summary.groupby(GROUP, sort=False):
        metrics = [m for m in TABLE_METRICS if m in set(group.metric)]
        header = ["method", *(f"{METRICS[m].label} {'↑' if METRICS[m].higher_is_better else '↓'}"
                              for m in metrics), "n"]
        if timing is not None:
            header.append("ms/img")
        lines += [f"### {dataset} · {model} · operator `{op}`", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        cells = group.set_index(["method", "metric"])
        for method in _ordered(group):
            row = [method]
            for m in metrics:
                if (method, m) in cells.index:
                    c = cells.loc[(method, m)]
                    row.append(f"{c['mean']:.3f} ± {c['ci95']:.3f}")
                else:
                    row.append("–")
            row.append(str(int(cells.loc[(method, MAIN_METRIC), "n"])))
            if timing is not None:
                t = timing[(timing.dataset == dataset) & (timing.method == method)]
                row.append(f"{t.ms_per_image.iloc[0]:.1f}" if len(t) else "–")
            lines.append("| " + " | ".join(row) + " |")
        for f in failures[failures.dataset == dataset].itertuples():
            lines.append(f"| {f.method} | failed: {f.error.replace('|', '/')} |" + " |" * (len(header) - 2))
        lines.append("")
    lines.append(AUC_NOTE)
    return "\n".join(lines) + "\n"


def wide_leaderboard(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, model, operator, method); ``<metric>``, ``<metric>_ci95`` columns."""
    wide = summary.pivot_table(index=[*GROUP, "method"], columns="metric",
                               values=["mean", "ci95"], sort=False)
    wide.columns = [m if stat == "mean" else f"{m}_ci95" for stat, m in wide.columns]
    n = summary[summary.metric == MAIN_METRIC].set_index([*GROUP, "method"])["n"]
    wide = wide.join(n).reset_index()
    metric_cols = [c for m in METRICS for c in (m, f"{m}_ci95") if c in wide.columns]
    wide = wide[[*GROUP, "method", *metric_cols, "n"]]
    order = wide.groupby(GROUP, sort=False)[MAIN_METRIC].rank(ascending=False, method="first")
    return wide.assign(_r=order).sort_values([*GROUP, "_r"]).drop(columns="_r")


def plot_curves(curves: pd.DataFrame, path: Path) -> None:
    """Mean p(target) curves per method with a 95% CI band: rows (dataset, operator), columns curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = curves[curves.quantity == "prob"]
    panels = probs[["dataset", "operator"]].drop_duplicates().values.tolist()
    curve_names = list(dict.fromkeys(probs.curve))
    fig, axes = plt.subplots(len(panels), len(curve_names), squeeze=False,
                             figsize=(4.2 * len(curve_names), 3.2 * len(panels)))
    methods = sorted(probs.method.unique())
    colours = dict(zip(methods, plt.get_cmap("tab10").colors))
    for r, (dataset, op) in enumerate(panels):
        sub = probs[(probs.dataset == dataset) & (probs.operator == op)]
        for c, curve in enumerate(curve_names):
            ax = axes[r][c]
            for method, df in sub[sub.curve == curve].groupby("method"):
                g = df.groupby("x")["value"]
                mean, sem, n = g.mean(), g.sem(), g.count()
                half = sem * stats.t.ppf(0.975, np.maximum(n - 1, 1))
                ax.plot(mean.index, mean.values, label=method, color=colours[method], lw=1.5)
                ax.fill_between(mean.index, mean - half, mean + half, color=colours[method], alpha=0.2)
            xlabel = "fraction inserted" if curve == "insertion" else "fraction removed"
            ax.set(title=f"{dataset} · {op} · {curve}", xlabel=xlabel, ylabel="p(target)",
                   xlim=(0, 1), ylim=(0, 1.02))
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_run(run_dir: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Writes every file of a run into a staging folder, then swaps it in as ``run_dir``.

    Either the whole new run folder appears or the old one stays as it was: a failure
    while writing leaves no half-written file behind.

    Args:
        run_dir: Final folder, e.g. ``results/default``.
        writers: File name -> function writing that file to the given path.
    """
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.staging-"))
    try:
        for name, write in writers.items():
            write(stage / name)
        old = None
        if run_dir.exists():
            old = Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.old-"))
            os.replace(run_dir, old / "run")
        os.replace(stage, run_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
