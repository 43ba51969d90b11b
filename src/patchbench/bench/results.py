"""Tidy results -> leaderboard tables and curve plots, and the atomic run-folder writer."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from patchbench.bench.report import Gallery, Section
from patchbench.bench.tables import Cell, Table, markdown
from patchbench.log import get_logger
from patchbench.metrics.scores import MAIN_SCORE, score, scores, shown
from patchbench.metrics.stats import bootstrap_ci, holm, normalise, paired_test, rank_agreement
from patchbench.utils import make_temp_dir

LOG = get_logger(__name__)
GROUP = ["dataset", "model", "operator"]
ALPHA = 0.05
AUC_NOTE = ("AUCs: trapezoid rule over the fraction of patches removed/inserted in [0, 1], "
            "both ends included (independent of the number of steps). "
            "SRG = LeRF p AUC - deletion p AUC. Under one operator, LeRF and insertion are "
            "the same images seen from opposite ends, so their AUCs are equal; Ins is not "
            "shown separately.")
CELL_NOTE = ("Cells: mean [95% bootstrap CI over images]; a method trained from several seeds "
             "shows the mean over seeds per image, then the range of the seeds' means "
             "(`seeds 3: low–high`). **Bold**: the best mean in the column; ≈: not "
             "significantly different from it (Wilcoxon signed-rank over the same images, "
             f"Holm-corrected within the column, α = {ALPHA}); other cells are significantly worse.")
UNIT_NOTE = ("Units in brackets: an AUC integrates that quantity over the fraction of patches "
             "removed, x in [0, 1] (p: probability of the target class; nats: KL(p_clean ‖ p); "
             "logit: the target's logit; acc: top-1 correct, 0 or 1), so its value is in those "
             "units; Chefer's perturbation scores are 100 × the AUC of accuracy over x in [0, 0.9].")
NORM_NOTE = ("Normalised: (score - random) / (best - random), so the `random` control is 0 and "
             "the best method in the column 1; below 0 is worse than random; – where random is "
             "the best (nothing to normalise by).")


def summarise(scores: pd.DataFrame, level: float = 0.95, n_boot: int = 2000, seed: int = 0,
              alpha: float = ALPHA, control: str | None = None) -> pd.DataFrame:
    """One row per (dataset, model, operator, method, metric) cell with its statistics.

    Operator-independent scores (operator ``"-"``: the localisation metrics) keep their own
    operator ``"-"`` rows.

    Args:
        scores: Tidy per-image rows (``dataset, model, method, operator, metric, sample_id,
            value``).
        level: Coverage of the bootstrap intervals.
        n_boot: Bootstrap resamples per cell.
        seed: Seed of the resampling (the same draws for every cell of a size).
        alpha: Level of the paired test against the column's best method.
        control: The chance-level method (a class with ``chance_control``) that normalised
            scores count from, or None.

    Returns:
        Columns ``mean, ci_low, ci_high, n, higher_is_better``; ``verdict``: ``best``,
        ``tie`` (not significantly different from the best) or ``worse``; ``p_vs_best``
        (Holm-adjusted); ``normalised`` (control = 0, best = 1; NaN without a control row).
    """
    rows = []
    for keys, cell in scores.groupby([*GROUP, "method", "metric"], sort=False)["value"]:
        low, high = bootstrap_ci(cell.to_numpy(), level, n_boot, seed)
        rows.append((*keys, cell.mean(), low, high, len(cell)))
    out = pd.DataFrame(rows, columns=[*GROUP, "method", "metric", "mean", "ci_low", "ci_high", "n"])
    out["higher_is_better"] = out.metric.map(lambda m: score(m).higher_is_better)
    out["verdict"], out["p_vs_best"], out["normalised"] = "", np.nan, np.nan
    for _, column in out.groupby([*GROUP, "metric"], sort=False):
        _judge(out, column, scores, alpha, control)
    return out


def with_seed_ranges(summary: pd.DataFrame, seed_scores: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with, for methods trained from several seeds, the range of the seeds'
    means: columns ``seed_min``, ``seed_max`` and ``seeds`` (NaN for the other methods).

    Args:
        summary: From :func:`summarise` (a seeded method's rows: the mean over its seeds).
        seed_scores: Per-image rows of each seed (the score columns and ``train_seed``).
    """
    keys = [*GROUP, "method", "metric"]
    per_seed = seed_scores.groupby([*keys, "train_seed"], sort=False).value.mean()
    ranges = per_seed.groupby(keys, sort=False).agg(seed_min="min", seed_max="max", seeds="count")
    return summary.merge(ranges.reset_index(), on=keys, how="left")


def _judge(out: pd.DataFrame, column: pd.DataFrame, scores: pd.DataFrame, alpha: float,
           control: str | None) -> None:
    """Fills verdict, p_vs_best and normalised for one column (one metric, one table)."""
    up = bool(column.higher_is_better.iloc[0])
    best = column["mean"].idxmax() if up else column["mean"].idxmin()
    first = column.iloc[0]
    per_image = scores[(scores.dataset == first.dataset) & (scores.model == first.model)
                       & (scores.operator == first.operator) & (scores.metric == first.metric)]
    table = per_image.pivot_table(index="sample_id", columns="method", values="value", sort=False)
    others = [i for i in column.index if i != best]
    raw = []
    for i in others:  # paired over the images both methods have a score for
        pair = table[[out.at[best, "method"], out.at[i, "method"]]].dropna()
        raw.append(paired_test(pair.iloc[:, 0].to_numpy(), pair.iloc[:, 1].to_numpy()))
    out.loc[best, ["verdict", "p_vs_best"]] = ["best", np.nan]
    for i, p in zip(others, holm(np.array(raw))):
        out.loc[i, ["verdict", "p_vs_best"]] = ["worse" if p < alpha else "tie", p]
    random = column[column.method == control]["mean"]
    if len(random):
        out.loc[column.index, "normalised"] = [
            normalise(m, float(random.iloc[0]), float(column.at[best, "mean"])) for m in column["mean"]]


def operator_agreement(summary: pd.DataFrame) -> pd.DataFrame:
    """Kendall's tau between the method rankings under every pair of operators.

    Returns:
        Rows ``dataset, model, metric, operators ("mean vs drop"), tau, methods`` for every
        faithfulness metric, over the methods scored under both operators.
    """
    rows = []
    # insertion is LeRF seen from the other end (equal AUCs): listed once, as LeRF
    tied = summary[(summary.operator != "-") & ~summary.metric.str.startswith("insertion")]
    for (dataset, model, metric), g in tied.groupby(["dataset", "model", "metric"], sort=False):
        means = {op: dict(zip(o.method, o["mean"])) for op, o in g.groupby("operator", sort=False)}
        ops = list(means)
        for i, a in enumerate(ops):
            for b in ops[i + 1:]:
                common = sorted(set(means[a]) & set(means[b]))
                if len(common) < 2:
                    continue
                tau = rank_agreement({m: means[a][m] for m in common}, {m: means[b][m] for m in common})
                rows.append({"dataset": dataset, "model": model, "metric": metric,
                             "operators": f"{a} vs {b}", "tau": tau, "methods": len(common)})
    return pd.DataFrame(rows, columns=["dataset", "model", "metric", "operators", "tau", "methods"])


def ground_truth_check(truth_scores: pd.DataFrame, scores: pd.DataFrame, control: str | None,
                       alpha: float = ALPHA) -> pd.DataFrame:
    """Does each faithfulness metric score the ground-truth mask better than chance?

    A metric that cannot tell the object's patches from random ones on a dataset does not
    measure faithfulness there; such cells are flagged.

    Args:
        truth_scores: Per-image rows of the ground-truth mask used as a map.
        scores: Per-image rows of the run.
        control: The chance-level method among them (e.g. ``random``); None: no check.
        alpha: Level of the one-sided reading of the Wilcoxon signed-rank test.

    Returns:
        Rows ``dataset, model, operator, metric, truth, random, p, verdict`` (``pass`` when
        the mask is better and the difference significant, else ``flag``).
    """
    columns = [*GROUP, "metric", "truth", "random", "p", "verdict"]
    control = scores[scores.method == control]
    if not len(truth_scores) or not len(control):
        return pd.DataFrame(columns=columns)
    keys = [*GROUP, "metric", "sample_id"]
    both = truth_scores.merge(control, on=keys, suffixes=("_truth", "_random"))
    both = both[~both.metric.str.startswith("insertion")]  # equal to LeRF: listed once
    rows = []
    for (dataset, model, op, metric), g in both.groupby([*GROUP, "metric"], sort=False):
        t, r = g.value_truth.to_numpy(), g.value_random.to_numpy()
        better = t.mean() > r.mean() if score(metric).higher_is_better else t.mean() < r.mean()
        p = paired_test(t, r)
        rows.append((dataset, model, op, metric, t.mean(), r.mean(), p,
                     "pass" if better and p < alpha else "flag"))
    return pd.DataFrame(rows, columns=columns)


def ground_truth_table(check: pd.DataFrame) -> Table:
    """The metric check as a table, one row per dataset, operator and metric."""
    rows = [[c.dataset, c.operator, _header(c.metric), Cell(c.truth, ".3f"), Cell(c.random, ".3f"),
             Cell(c.p, ".2g"), Cell(c.verdict, mark=c.verdict)] for c in check.itertuples()]
    note = ("The ground-truth mask used as a map (object patches first) must score better than "
            f"the `random` control (Wilcoxon signed-rank over images, p < {ALPHA}). A flagged "
            "metric does not tell the object from random patches on that dataset: read its "
            "column (marked ⚠ in the leaderboard) with care.")
    return Table("Metric check: the ground-truth mask against random",
                 ["dataset", "operator", "metric", "mask", "random", "p", "verdict"], rows, [note])


def sanity_table(sanity: pd.DataFrame) -> list[Table]:
    """The model-randomisation check, one table per dataset: a row per method, the mean rank
    correlation with the trained model's maps after each cumulative stage, and the verdict."""
    tables = []
    for (dataset, model), g in sanity.groupby(["dataset", "model"], sort=False):
        stages = list(dict.fromkeys(g.sort_values("stage_index").stage))
        retrained = g.get("retrained", pd.Series("", index=g.index)).fillna("")
        shown = bool((retrained != "").any())
        rows = []
        for method, m in g.groupby("method", sort=False):
            rho = dict(zip(m.stage, m.spearman))
            verdict = str(m.verdict.iloc[0])
            rows.append([method, *([retrained[m.index[0]] or "no"] if shown else []),
                         *(Cell(rho.get(st), ".2f") for st in stages),
                         Cell(verdict, mark=_sanity_mark(verdict))])
        notes = [RETRAINED_NOTE] if shown else []
        note = ("Cascading model-parameter randomisation (Adebayo et al., 2018): from the head "
                "down, each column re-initialises one more part of the model; cells are the mean "
                "Spearman correlation between a method's maps on the trained and on the "
                f"randomised model ({int(g.n.max())} images). A method passes when its maps, with "
                f"everything randomised, correlate below {float(g.threshold.iloc[0]):g} with the "
                "trained ones: maps that do not change with the model cannot explain it.")
        tables.append(Table(f"Sanity check: model randomisation · {dataset} · {model}",
                            ["method", *(["retrained"] if shown else []), *(f"ρ +{st}" for st in stages),
                             "verdict"], rows, [note, *notes]))
    return tables


RETRAINED_NOTE = ("Retrained: a trained method (DiffMask) is trained again, for the steps shown, "
                  "on the trained model and on each randomised copy, and the two explainers' maps "
                  "are compared; the explainer trained for the original model is never reused on "
                  "another model.")


def _sanity_mark(verdict: str) -> str:
    if verdict.startswith("not applicable"):
        return ""
    return "pass" if verdict == "pass" else "fail"


def verdict_lines(summary: pd.DataFrame, check: pd.DataFrame, sanity: pd.DataFrame) -> list[str]:
    """Plain sentences for the top of the report: who wins where, with what confidence."""
    lines = []
    main = summary[summary.metric == MAIN_SCORE]
    for (dataset, _model, op), g in main.groupby(GROUP, sort=False):
        best = g[g.verdict == "best"].method.tolist()
        ties = g[g.verdict == "tie"].method.tolist()
        text = f"{dataset} · operator {op}: best {score(MAIN_SCORE).label} is {', '.join(best)}"
        text += (f"; not significantly different from it: {', '.join(ties)}." if ties
                 else "; every other method is significantly worse.")
        lines.append(text)
    loc = summary[summary.metric == "auroc"]
    for (dataset, _model), g in loc.groupby(["dataset", "model"], sort=False):
        best = g[g.verdict == "best"].method.tolist()
        lines.append(f"{dataset}: best localisation (AUROC) is {', '.join(best)}.")
    if len(check):
        flags = check[check.verdict == "flag"]
        lines.append("Metric check: the ground-truth mask beats random on every faithfulness metric."
                     if not len(flags) else "Metric check: flagged (the ground-truth mask does not "
                     "beat random): " + "; ".join(f"{c.dataset} {c.operator} {score(c.metric).label}"
                                                   for c in flags.itertuples()) + ".")
    if len(sanity):
        verdicts = sanity.drop_duplicates(["dataset", "method"])
        for dataset, g in verdicts.groupby("dataset", sort=False):
            na = g[g.verdict.str.startswith("not applicable")].method.tolist()
            failed = g[(g.verdict != "pass") & ~g.method.isin(na)].method.tolist()
            lines.append(f"{dataset} model randomisation: "
                         + (f"fail: {', '.join(failed)}." if failed else "every checked method passes.")
                         + (f" Not applicable: {', '.join(na)}." if na else ""))
    return lines


def report_sections(cfg: Any, summary: pd.DataFrame, timing: pd.DataFrame, failures: pd.DataFrame,
                    flagged: pd.DataFrame, extra: list[Table], check: pd.DataFrame,
                    sanity: pd.DataFrame, curves_png: bytes, galleries: list[Gallery]) -> list[Section]:
    """The sections of ``report.html``: verdicts, leaderboards, curves, gallery, statistics."""
    sections = [Section("Summary", [
        f"Model {cfg.model}; datasets {', '.join(cfg.datasets)}; {cfg.n_images} images each; "
        f"removal operators {', '.join(cfg.operators)}; {cfg.steps or 'one patch per'} steps per "
        f"curve; target: the model's {cfg.target}.",
        *(verdict_lines(summary, check, sanity) if len(summary) else []),
        CELL_NOTE.replace("**Bold**", "Bold"), AUC_NOTE])]
    if len(summary):
        sections.append(Section("Leaderboards", tables=leaderboard_tables(summary, timing, failures,
                                                                          flagged, cfg.scores)))
    elif len(failures):
        rows = [[f.dataset, f.method, Cell(str(f.error), mark="fail")] for f in failures.itertuples()]
        sections.append(Section("Leaderboards", ["Every method failed; nothing was scored."],
                                [Table("Failures", ["dataset", "method", "error"], rows)]))
    if curves_png:
        sections.append(Section("Curves", figures=[(
            "Mean p(target) along each curve with a 95% band, per dataset and operator.", curves_png)]))
    if galleries:
        sections.append(Section("Gallery", ["Each row: the image, its ground truth (when the "
                                            "dataset has one) and every method's patch map."],
                                galleries=galleries))
    if extra:
        sections.append(Section("Statistics and checks", tables=list(extra)))
    return sections


def _ordered(group: pd.DataFrame, metric: str) -> list[str]:
    main = group[group.metric == metric].set_index("method")["mean"]
    return main.sort_values(ascending=not score(metric).higher_is_better, kind="stable").index.tolist()


def _cell(c: pd.Series) -> Cell:
    """A leaderboard cell: mean, interval, and the verdict as its mark (≈ after a tie)."""
    seeds = c.get("seeds")
    spread = ((float(c["seed_min"]), float(c["seed_max"]), int(seeds))
              if seeds is not None and not pd.isna(seeds) and seeds > 1 else None)
    return Cell(float(c["mean"]), ".3f", float(c["ci_low"]), float(c["ci_high"]), c["verdict"],
                "≈" if c["verdict"] == "tie" else "", spread)


def _header(metric: str) -> str:
    """``label ↑`` or ``label ↓``, then the unit in brackets (e.g. ``Del KL ↑ [nats]``)."""
    s = score(metric)
    return f"{s.label} {'↑' if s.higher_is_better else '↓'}" + (f" [{s.unit}]" if s.unit else "")


def leaderboard_tables(summary: pd.DataFrame, timing: pd.DataFrame | None = None,
                       failures: pd.DataFrame | None = None, flagged: pd.DataFrame | None = None,
                       selection: tuple[str, ...] = ()) -> list[Table]:
    """Leaderboards: per (dataset, model, operator) the faithfulness scores, best first, then
    per (dataset, model) the ground-truth localisation scores.

    Args:
        summary: From :func:`summarise`.
        timing: Optional ``dataset, method, ms_per_image`` attribution times.
        failures: Optional ``dataset, method, error`` rows, shown as ``failed: <reason>`` rows.
        flagged: Optional ``dataset, operator, metric`` rows of metrics that failed the
            ground-truth check; their column headers get a ⚠.
        selection: The scores to show as columns (default: those declared as columns).
    """
    failures = failures if failures is not None else pd.DataFrame(columns=["dataset", "method", "error"])
    flags = set() if flagged is None else set(zip(flagged.dataset, flagged.operator, flagged.metric))
    tables = []
    groups = list(summary[summary.operator != "-"].groupby(GROUP, sort=False))
    groups += list(summary[summary.operator == "-"].groupby(GROUP, sort=False))
    for (dataset, model, op), group in groups:
        faithful = op != "-"
        wanted = shown("faithfulness" if faithful else "localisation", selection)
        metrics = [m for m in wanted if m in set(group.metric)]
        header = ["method", *(_header(m) + (" ⚠" if (dataset, op, m) in flags else "")
                              for m in metrics), "n"]
        costs = _costs(timing, dataset, op) if timing is not None and faithful else None
        amortised = bool(costs) and any(setup is not None for _, setup, _ in costs.values())
        if costs is not None:
            header += ["ms/img", "setup s", "amortised ms/img"] if amortised else ["ms/img"]
        cells = group.set_index(["method", "metric"])
        rows = []
        for method in _ordered(group, metrics[0]):
            row = [method, *(_cell(cells.loc[(method, m)]) if (method, m) in cells.index else Cell(None)
                             for m in metrics), int(cells.loc[(method, metrics[0]), "n"])]
            if costs is not None:
                row += _cost_cells(costs.get(method), amortised)
            rows.append(row)
        for f in failures[failures.dataset == dataset].itertuples():
            rows.append([f.method, Cell(f"failed: {f.error}", mark="fail"), *[""] * (len(header) - 2)])
        title = (f"{dataset} · {model} · operator `{op}`" if faithful
                 else f"{dataset} · {model} · ground-truth localisation")
        notes = [CELL_NOTE, *([UNIT_NOTE] if faithful else []),
                 *([_break_even_note(costs)] if amortised else [])]
        tables.append(Table(title, header, rows, notes))
    return tables


def _costs(timing: pd.DataFrame, dataset: str, op: str) -> dict[str, tuple[float, float | None, int]]:
    """Method -> (ms per image of its pass, setup seconds or None, images) in operator ``op``'s
    table: a method trained for each operator has the cost of the instance trained for ``op``."""
    out: dict[str, tuple[float, float | None, int]] = {}
    for r in timing[timing.dataset == dataset].itertuples():
        own = getattr(r, "operator", "") or ""
        if own in ("", op):
            setup = getattr(r, "setup_seconds", None)
            images = int(getattr(r, "images", 0) or 0)
            out[r.method] = (float(r.ms_per_image), None if setup is None or pd.isna(setup) else float(setup),
                             images)
    return out


def _cost_cells(cost: tuple[float, float | None, int] | None, amortised: bool) -> list[Cell]:
    if cost is None:
        return [Cell(None, ".1f")] * (3 if amortised else 1)
    ms, setup, images = cost
    if not amortised:
        return [Cell(ms, ".1f")]
    total = ms + 1000 * setup / images if setup is not None and images else ms
    return [Cell(ms, ".1f"), Cell(setup, ".0f"), Cell(total, ".1f")]


def _break_even_note(costs: dict[str, tuple[float, float | None, int]]) -> str:
    """When an amortised method's setup is paid back against each slower per-image method."""
    parts = []
    for method, (ms, setup, images) in costs.items():
        if setup is None:
            continue
        slower = {m: c[0] for m, c in costs.items() if c[1] is None and c[0] > ms}
        pairs = [f"{m} after {math.ceil(1000 * setup / (other - ms)):,} images"
                 for m, other in sorted(slower.items(), key=lambda kv: -kv[1])]
        parts.append(f"`{method}`: setup {setup:.0f} s (training, once per model and operator, "
                     "summed over its training seeds; a cached explainer shows what it cost when "
                     f"trained), so {1000 * setup / images:.0f} ms per image over these {images} "
                     "images; it breaks even with "
                     + (", ".join(pairs) if pairs else "no per-image method (all are faster)") + ".")
    return "Cost: ms/img is the attribution pass alone. " + " ".join(parts)


def normalised_tables(summary: pd.DataFrame, selection: tuple[str, ...] = ()) -> list[Table]:
    """Per (dataset, model, operator): the shown faithfulness scores (see
    :func:`leaderboard_tables`) normalised (random 0, best 1)."""
    tables = []
    tied = summary[summary.operator != "-"]
    for (dataset, model, op), group in tied.groupby(GROUP, sort=False):
        if group.normalised.isna().all():  # no random control in this table
            continue
        metrics = [m for m in shown("faithfulness", selection) if m in set(group.metric)]
        cells = group.set_index(["method", "metric"])["normalised"].dropna()
        rows = [[method, *(Cell(cells.get((method, m)), ".2f") for m in metrics)]
                for method in _ordered(group, metrics[0])]
        tables.append(Table(f"{dataset} · {model} · operator `{op}` · normalised",
                            ["method", *(_header(m) for m in metrics)], rows, [NORM_NOTE]))
    return tables


def agreement_table(agreement: pd.DataFrame) -> Table:
    """Kendall's tau of the method rankings between operators, one row per dataset and metric."""
    pairs = list(dict.fromkeys(agreement.operators))
    rows = []
    for (dataset, model, metric), g in agreement.groupby(["dataset", "model", "metric"], sort=False):
        taus = dict(zip(g.operators, g.tau))
        rows.append([dataset, model, score(metric).label,
                     *(Cell(taus.get(p), ".2f") for p in pairs)])
    note = ("Kendall's tau between the rankings of the methods by mean score under two removal "
            "operators: 1 = the same order, 0 = unrelated, -1 = reversed. A low tau means the "
            "ranking depends on how patches are removed.")
    return Table("Rank stability across removal operators (Kendall's tau)",
                 ["dataset", "model", "metric", *(f"τ {p}" for p in pairs)], rows, [note])


def transfer_table(scores: pd.DataFrame, transfer: pd.DataFrame, metric: str = MAIN_SCORE) -> list[Table]:
    """Methods trained for the removal they are scored under (DiffMask), per dataset: each
    instance (a row, "trained for X") scored under every operator (a column), mean [95% CI].

    Args:
        scores: The run's per-image rows (the diagonal: each instance under its own operator).
        transfer: Per-image rows of the other pairs, with a ``trained_for`` column.
        metric: The score shown.
    """
    tables = []
    for (dataset, model, method), off in transfer.groupby(["dataset", "model", "method"], sort=False):
        own = scores[(scores.dataset == dataset) & (scores.method == method) & (scores.operator != "-")]
        both = pd.concat([own.assign(trained_for=own.operator), off])
        both = both[both.metric == metric]
        operators = list(dict.fromkeys(own.operator))
        cells = {k: g.value.to_numpy() for k, g in both.groupby(["trained_for", "operator"])}
        rows = []
        for trained in operators:
            row = [f"{method} trained for {trained}"]
            for op in operators:
                v = cells.get((trained, op))
                low, high = bootstrap_ci(v) if v is not None else (None, None)
                row.append(Cell(float(v.mean()) if v is not None else None, ".3f", low, high))
            rows.append(row)
        note = ("Each row is one explainer, trained against the continuous relaxation of one "
                "removal operator (the same objective: the smallest mask that keeps the output, "
                "KL <= eps). The diagonal is what the leaderboards show; the other cells score "
                "the same explainer under another operator, to read how it transfers. They are "
                "not leaderboard entries.")
        tables.append(Table(f"Trained for X, scored under Y · {dataset} · {model} · {score(metric).label}",
                            ["explainer", *(f"under `{op}`" for op in operators)], rows, [note]))
    return tables


def stages_table(stages: list[dict[str, Any]]) -> Table:
    """Where the time went: seconds per stage and dataset, in the order they ran (on several
    processes, the slowest process's)."""
    total = sum(s["seconds"] for s in stages) or 1.0
    rows = [[s["dataset"], s["stage"], Cell(s["seconds"], ".1f"), Cell(s["seconds"] / total, ".0%")]
            for s in stages]
    note = ("Stages whose results were stored by an earlier run take almost no time. Model and "
            "explainer training count only when they ran in this run; attribution is per method, "
            "curves per removal operator (all methods).")
    return Table("Where the time went", ["dataset", "stage", "seconds", "share"], rows, [note])


def render_markdown(summary: pd.DataFrame, timing: pd.DataFrame | None = None,
                    failures: pd.DataFrame | None = None, extra: list[Table] = (),
                    flagged: pd.DataFrame | None = None, selection: tuple[str, ...] = ()) -> str:
    """Markdown leaderboards (see :func:`leaderboard_tables`), then ``extra`` tables.

    Args:
        summary: From :func:`summarise`.
        timing: Optional ``dataset, method, ms_per_image`` attribution times.
        failures: Optional ``dataset, method, error`` rows (listed on their own when nothing
            else was scored).
        extra: More tables (normalised scores, rank stability, sanity checks).
        flagged: Metrics that failed the ground-truth check (see :func:`leaderboard_tables`).
        selection: The scores shown as columns (see :func:`leaderboard_tables`).
    """
    if summary.empty:
        failures = failures if failures is not None else pd.DataFrame(columns=["dataset", "method", "error"])
        lines = [f"- {f.dataset} · `{f.method}`: failed: {f.error}" for f in failures.itertuples()]
        return "\n".join([*lines, "", AUC_NOTE]) + "\n"
    tables = [*leaderboard_tables(summary, timing, failures, flagged, selection), *extra]
    # the cell and unit notes once, after the leaderboards, not under each table
    once = (CELL_NOTE, UNIT_NOTE)
    parts = [markdown(Table(t.title, t.header, t.rows, [n for n in t.notes if n not in once]))
             for t in tables]
    return "\n\n".join([*(part.rstrip("\n") for part in parts), *once, AUC_NOTE]) + "\n"


def wide_leaderboard(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, model, operator, method); per metric the columns ``<metric>``,
    ``<metric>_ci_low``, ``<metric>_ci_high``, ``<metric>_verdict``; localisation scores
    on operator ``-`` rows."""
    index = [*GROUP, "method"]
    values = ["mean", "ci_low", "ci_high", "verdict"]
    wide = summary.set_index([*index, "metric"])[values].unstack("metric")
    wide.columns = [m if stat == "mean" else f"{m}_{stat}" for stat, m in wide.columns]
    n = summary.groupby(index, sort=False)["n"].max()
    wide = wide.join(n).reset_index()
    metric_cols = [f"{m.name}{s}" for m in scores() for s in ("", "_ci_low", "_ci_high", "_verdict")
                   if f"{m.name}{s}" in wide.columns]
    wide = wide[[*index, *metric_cols, "n"]]
    groups = {g: i for i, g in enumerate(dict.fromkeys(map(tuple, summary[GROUP].to_numpy())))}
    main = wide[MAIN_SCORE] if MAIN_SCORE in wide else pd.Series(np.nan, index=wide.index)
    sort_by = main.where(main.notna(), wide.get("auroc", main))
    rank = sort_by.groupby([wide[c] for c in GROUP], sort=False).rank(ascending=False, method="first")
    group_pos = wide[GROUP].apply(tuple, axis=1).map(groups)
    return wide.assign(_g=group_pos, _r=rank).sort_values(["_g", "_r"]).drop(columns=["_g", "_r"])


def plot_curves(curves: pd.DataFrame) -> bytes:
    """Mean p(target) curves per method with a 95% CI band: rows (dataset, operator), columns curve.

    Returns:
        The figure as PNG bytes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = curves[curves.quantity == "prob"]
    panels = probs[["dataset", "operator"]].drop_duplicates().values.tolist()
    curve_names = list(dict.fromkeys(probs.curve))
    fig, axes = plt.subplots(len(panels), len(curve_names), squeeze=False,
                             figsize=(4.2 * len(curve_names), 3.2 * len(panels)))
    methods = sorted(probs.method.unique())
    palette = [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors]
    colours = dict(zip(methods, palette * (len(methods) // len(palette) + 1)))
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


class RunFolderError(ValueError):
    """A run would replace a folder that patchbench did not write."""


def check_replaceable(run_dir: Path, marker: str = "run.json") -> None:
    """Refuses, before any work, to replace a folder that is not an earlier run's.

    A run folder may be replaced when it does not exist, is empty, or holds the ``marker``
    file that patchbench writes into every run folder (a JSON object naming its version).

    Raises:
        RunFolderError: ``run_dir`` is a file, or a folder with other content.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists() and not run_dir.is_symlink():
        return
    if run_dir.is_symlink() or not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} exists and is not a folder; choose another run name")
    if not any(run_dir.iterdir()) or _is_run_marker(run_dir / marker):
        return
    raise RunFolderError(f"{run_dir} exists and is not a patchbench run folder (no {marker} written "
                         "by patchbench); refusing to replace it: choose another --run or "
                         "--results-dir, or move it away yourself")


def _is_run_marker(path: Path) -> bool:
    try:
        return "patchbench_version" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Holds ``.locks/<run>.lock`` beside the run folder: one writer of a run folder at a time.

    The lock file stays (removing it would let a third writer lock a new file while the
    second still holds the old one); the kernel releases the lock when the process dies.
    """
    locks = run_dir.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{run_dir.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            LOG.info(f"patchbench: waiting for another process writing {run_dir}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clean_leftovers(run_dir: Path) -> None:
    """Under the lock: staging and swap folders of this run left by a killed writer.

    A writer killed between its two renames leaves the previous run in ``.<run>.old-*/run``
    and no run folder: that run is moved back rather than lost.
    """
    for old in sorted(run_dir.parent.glob(f".{run_dir.name}.old-*")):
        if not run_dir.exists() and (old / "run").is_dir():
            os.replace(old / "run", run_dir)
        shutil.rmtree(old, ignore_errors=True)
    for stage in run_dir.parent.glob(f".{run_dir.name}.staging-*"):
        shutil.rmtree(stage, ignore_errors=True)


def write_run(run_dir: Path, writers: dict[str, Callable[[Path], None]], marker: str = "run.json") -> None:
    """Writes every file of a run into a staging folder, then swaps it in as ``run_dir``.

    Either the whole new run folder appears or the old one stays as it was: a failure
    while writing leaves no half-written file behind. Writers of the same run folder take
    turns (a lock file beside it), and a folder patchbench did not write is never replaced.

    Args:
        run_dir: Final folder, e.g. ``results/default``.
        writers: File name -> function writing that file to the given path.
        marker: The file among ``writers`` that marks a folder as a patchbench run.

    Raises:
        RunFolderError: ``run_dir`` holds something else (see :func:`check_replaceable`).
    """
    run_dir = Path(run_dir)
    with run_lock(run_dir):
        _clean_leftovers(run_dir)
        check_replaceable(run_dir, marker)
        stage = make_temp_dir(run_dir.parent, f".{run_dir.name}.staging-")
        try:
            for name, write in writers.items():
                write(stage / name)
            old = None
            if run_dir.exists():
                old = make_temp_dir(run_dir.parent, f".{run_dir.name}.old-")
                os.replace(run_dir, old / "run")
            os.replace(stage, run_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
