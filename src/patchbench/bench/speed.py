"""``patchbench speed``: what the harness costs, measured side by side.

One model, one set of images, one set of maps. Every way of computing the same curve is run
on them and timed: the bare model's forward passes at its best batch size (the bound no
harness can beat), patchbench's harness, a naive loop (one image, one step at a time, as
most peers do), and Quantus's ``RegionPerturbation`` and ``PixelFlipping``. Each slow run's
curve is checked against patchbench's, so "the same work" is verified, not assumed. Then
the cost of every operator, of every method's attribution, and the memory used.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from patchbench import __version__
from patchbench.bench.config import BenchConfig, SpeedConfig
from patchbench.bench.results import write_run
from patchbench.bench.runner import Job, prepare
from patchbench.bench.tables import Cell, Table, markdown
from patchbench.memory import format_bytes, parse_bytes, peak_rss, reset_peak_rss, row_bytes
from patchbench.methods import create_method
from patchbench.metrics import faithfulness_curves, prepare_reference
from patchbench.metrics.functional import keep_masks, patch_ranking, step_counts
from patchbench.models import OPERATORS, create_operator
from patchbench.utils import autocast, provenance, resolve_device, seed_everything, sync, write_json

GOAL_BOUND_RATIO = 1.2
GOAL_SPEEDUP = 20.0


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 1, warmup: bool = False
          ) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls (after one untimed call if ``warmup``), and the result."""
    if warmup:
        fn()
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _batch(images: Tensor, batch: int) -> Tensor:
    """``batch`` clean images, the set repeated as often as needed."""
    return images.repeat(batch // len(images) + 1, 1, 1, 1)[:batch]


@torch.inference_mode()
def bare_forwards(adapter: Any, images: Tensor, rows: int, batch: int, device: torch.device,
                  amp: str | None) -> None:
    """``rows`` forward passes of the bare model on clean images, ``batch`` at a time."""
    x = _batch(images, batch)
    with autocast(device, amp):
        for start in range(0, rows, batch):
            adapter.logits(x[: min(batch, rows - start)])


@torch.inference_mode()
def forward_rate(adapter: Any, images: Tensor, batch: int, device: torch.device, amp: str | None,
                 min_seconds: float = 0.5) -> float:
    """Rows per second of the bare model (``adapter.logits``) at one batch size."""
    x = _batch(images, batch)
    with autocast(device, amp):
        adapter.logits(x)  # warm-up: allocator, kernels, caches
        sync(device)
        rows, t0 = 0, time.perf_counter()
        while rows < 2 * batch or time.perf_counter() - t0 < min_seconds:
            adapter.logits(x)
            rows += batch
        sync(device)
    return rows / (time.perf_counter() - t0)


def best_forward_rate(adapter: Any, images: Tensor, device: torch.device, amp: str | None,
                      largest: int) -> tuple[int, float, dict[int, float]]:
    """The bound: the bare model's best throughput over batch sizes 1, 2, 4, ... ``largest``."""
    rates: dict[int, float] = {}
    batch = 1
    while batch <= largest:
        try:
            rates[batch] = forward_rate(adapter, images, batch, device, amp)
        except torch.OutOfMemoryError:
            break
        batch *= 2
    best = max(rates, key=rates.get)
    return best, rates[best], rates


@torch.inference_mode()
def naive_deletion(adapter: Any, operator: Any, images: Tensor, target: Tensor, maps: Tensor,
                   state: Tensor | None, steps: int | None) -> Tensor:
    """The deletion curve the way most tools compute it: one image and one step per forward pass.

    Returns:
        ``[B, S + 1]`` probabilities of the target (the clean point included).
    """
    counts = step_counts(adapter.num_patches, steps)
    out = torch.empty(len(images), len(counts))
    for i in range(len(images)):
        keep = keep_masks(patch_ranking(maps[i : i + 1]), counts, "deletion")[0]
        for j in range(len(counts)):
            s = None if state is None else state[i : i + 1]
            logits = operator(adapter, images[i : i + 1], keep[j : j + 1], s)
            out[i, j] = logits.float().softmax(-1)[0, target[i]].item()
    return out


def quantus_deletion(kind: str, adapter: Any, images: Tensor, target: Tensor, maps: Tensor,
                     baseline: float, device: torch.device, batch_size: int) -> tuple[Tensor, str]:
    """The deletion curve computed by Quantus, at patch level.

    ``RegionPerturbation`` removes one patch-sized region per step (it reports the drop from
    the clean probability, turned back into probabilities here). ``PixelFlipping`` counts
    every channel of every pixel as a feature, and its step must divide H x W; at the patch
    area per step it takes C steps per patch, so every C-th point is a whole-patch point.

    Returns:
        ``[B, P]`` probabilities after 1 .. P patches are removed, and what Quantus ran.
    """
    import numpy as np
    import quantus

    ph, pw = adapter.patch_size
    a = torch.nn.functional.interpolate(maps[:, None].float().cpu(), scale_factor=(ph, pw),
                                        mode="nearest").numpy()
    x = images.float().cpu().numpy()
    y = target.cpu().numpy()
    common = dict(abs=False, normalise=False, perturb_baseline=baseline, disable_warnings=True)
    model = adapter.model.eval()
    dev = "cuda" if device.type == "cuda" else "cpu"
    if kind == "RegionPerturbation":
        if ph != pw:
            raise ValueError(f"RegionPerturbation takes square regions; patches are {ph}x{pw}")
        metric = quantus.RegionPerturbation(patch_size=ph, regions_evaluation=adapter.num_patches,
                                            order="morf", **common)
        drop = np.asarray(metric(model=model, x_batch=x, y_batch=y, a_batch=a, device=dev,
                                 batch_size=batch_size))
        with torch.inference_mode():
            clean = adapter.logits(images).float().softmax(-1).gather(1, target.view(-1, 1)).cpu()
        return clean - torch.from_numpy(drop).float(), (
            f"RegionPerturbation(patch_size={ph}, regions_evaluation={adapter.num_patches}, order='morf', "
            f"perturb_baseline={baseline}), batch_size={batch_size}")
    channels = images.shape[1]
    metric = quantus.PixelFlipping(features_in_step=ph * pw, **common)
    prob = np.asarray(metric(model=model, x_batch=x, y_batch=y, a_batch=a, device=dev,
                             batch_size=batch_size))
    return torch.from_numpy(prob[:, channels - 1 :: channels]).float(), (
        f"PixelFlipping(features_in_step={ph * pw}, perturb_baseline={baseline}), batch_size={batch_size}: "
        f"{prob.shape[1]} steps per image, {channels} per patch")


def _attribution_ms(name: str, job: Job, batch_size: int, device: torch.device, amp: str | None) -> float:
    """Milliseconds per image of one method's attribution (after a warm-up call)."""
    images, target = job.images, job.target
    method = create_method(name, job.run.adapter, **job.options(name, job.variants(name)[0]))

    def run() -> None:
        with autocast(device, amp):
            for x, t in zip(images.split(batch_size), target.split(batch_size)):
                method.attribute(x, t)

    with autocast(device, amp):
        method.attribute(images[:2], target[:2])  # warm-up
    seconds, _ = timed(run, device)
    return 1000 * seconds / len(images)


@dataclass
class Timing:
    """One speed run's shared state: the prepared job, random maps, and the rows measured."""

    cfg: SpeedConfig
    job: Job
    device: torch.device
    maps: Tensor
    counts: Tensor
    constant: Any = None  # a constant-baseline operator Quantus can apply too, and its reference
    reference: Any = None
    ours: Tensor | None = None  # patchbench's deletion curve ``[N, S + 1]``, the one compared with
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def interior(self) -> int:
        """Forward rows per image and curve (the clean and all-removed points are shared)."""
        return len(self.counts) - 2

    def record(self, table: str, item: str, **values: Any) -> None:
        self.rows.append({"table": table, "item": item, **values})

    def harness(self, op: Any, reference: Any, curves: tuple[str, ...] = ("deletion",)) -> Any:
        """patchbench's curves of the random maps under ``op``."""
        job = self.job
        with autocast(self.device, self.cfg.autocast):
            return faithfulness_curves(job.run.adapter, op, job.images, job.target, self.maps, reference,
                                       self.cfg.steps, job.chunk, curves=curves)


def run_speed(cfg: SpeedConfig, progress: bool = True, pretrained: bool = False,
              data_root: str | None = None) -> dict[str, Any]:
    """Runs every measurement and writes ``speed.md``, ``speed.csv`` and ``speed.json`` to ``cfg.out``.

    Args:
        cfg: What to measure.
        progress: Show progress bars.
        pretrained: Load timm's weights for a timm model (the default is random weights: speed
            does not depend on them).
        data_root: Folder of a dataset on disk.

    Returns:
        ``{"markdown", "rows" (tidy DataFrame), "out", "context"}``.
    """
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    bench_cfg = BenchConfig(model=cfg.model, datasets=(cfg.dataset,), n_images=cfg.n_images, seed=cfg.seed,
                            methods=cfg.methods, operators=cfg.operators, device=cfg.device,
                            autocast=cfg.autocast, chunk_size=cfg.chunk_size, memory_budget=cfg.memory_budget,
                            pretrained=pretrained, data_root=data_root, gallery_size=0)
    bench_cfg.validate()
    # the benchmark's own preparation: model, images, targets, operators and their references
    job = prepare(bench_cfg, cfg.dataset, device, progress=progress, timing_only=True)
    maps = torch.rand(len(job.ids), *job.run.adapter.grid, generator=torch.Generator().manual_seed(cfg.seed))
    t = Timing(cfg, job, device, maps.to(device), step_counts(job.run.adapter.num_patches, cfg.steps),
               *_constant(job))
    steps = tqdm(total=4, desc="speed", disable=not progress)
    bound_per_row, rates = _same_work(t)
    steps.update()
    _slow_runs(t)
    steps.update()
    _operator_costs(t, bound_per_row)
    steps.update()
    for name in bench_cfg.methods:  # those the model can serve
        t.record("attribution", name, ms_per_image=_attribution_ms(name, job, cfg.batch_size, device,
                                                                    cfg.autocast), images=len(job.ids))
    steps.close()
    for batch, rate in rates.items():
        t.record("forward_rate", str(batch), rows_per_second=rate)
    return _write_speed(t)


def _constant(job: Job) -> tuple[Any, Any]:
    """A constant baseline (0 in the model's input) that Quantus can apply too, with its reference."""
    constant = create_operator("mean", colour=(0.0,) * job.images.shape[1])
    ids = torch.tensor(job.ids)
    return constant, prepare_reference(job.run.adapter, constant, job.images, ids, job.chunk)


def _same_work(t: Timing) -> tuple[float, dict[int, float]]:
    """The bare model's bound and patchbench's harness on the same deletion curve.

    Returns:
        Seconds per forward row at the bound, and rows per second per batch size.
    """
    job, cfg, device = t.job, t.cfg, t.device
    adapter, images = job.run.adapter, job.images
    constant, ref = t.constant, t.reference
    best_batch, _, rates = best_forward_rate(adapter, images, device, cfg.autocast, max(1024, job.chunk))
    rows = len(images) * t.interior
    t.harness(constant, ref)  # warm-up
    t_bound, t_harness = [], []
    for _ in range(cfg.repeats):  # alternating, so drifting machine speed touches both alike
        t_bound.append(timed(lambda: bare_forwards(adapter, images, rows, best_batch, device, cfg.autocast),
                             device)[0])
        seconds, ours = timed(lambda: t.harness(constant, ref), device)
        t_harness.append(seconds)
    t.ours = ours.prob["deletion"].cpu()
    bound = statistics.median(t_bound)
    t.record("same_work", "forward bound", seconds=bound, rows=rows, images=len(images),
             note=f"bare model at its best batch size ({best_batch})")
    t.record("same_work", "patchbench", seconds=statistics.median(t_harness), rows=rows, images=len(images),
             note=f"faithfulness_curves, {job.chunk} rows per pass; the curve the others are compared with")
    return bound / rows, rates


def _slow_runs(t: Timing) -> None:
    """The same curve by a naive loop and by Quantus, on the first ``slow_images``, each
    checked against patchbench's."""
    job, cfg, device = t.job, t.cfg, t.device
    adapter, images, target, maps = job.run.adapter, job.images, job.target, t.maps
    constant, ref = t.constant, t.reference
    slow = min(cfg.slow_images or len(images), len(images))
    sub = slice(0, slow)
    state = None if ref.state is None else ref.state[sub]
    t_naive, naive = timed(lambda: naive_deletion(adapter, constant, images[sub], target[sub], maps[sub],
                                                  state, cfg.steps), device)
    t.record("same_work", "naive loop", seconds=t_naive, rows=slow * t.interior, images=slow,
             max_abs_diff=float((naive[:, 1:-1] - t.ours[sub, 1:-1]).abs().max()),
             note="one image and one step per forward pass")
    version = _version("quantus") if cfg.quantus else None
    if cfg.quantus and not version:
        t.record("same_work", "Quantus", note="not installed: pip install 'patchbench[bench]'")
    elif version and cfg.steps is not None:
        t.record("same_work", "Quantus",
                 note="skipped: Quantus steps one patch at a time; run with --steps 0")
    elif version:
        p = adapter.num_patches
        for kind in ("RegionPerturbation", "PixelFlipping"):
            if kind == "PixelFlipping" and (images.shape[-1] * images.shape[-2]) % p:
                continue
            seconds, (curve, what) = timed(lambda kind=kind: quantus_deletion(
                kind, adapter, images[sub], target[sub], maps[sub], 0.0, device, 64), device)
            t.record("same_work", f"Quantus {version} {kind}", seconds=seconds, images=slow,
                     rows=slow * p * (images.shape[1] if kind == "PixelFlipping" else 1),
                     max_abs_diff=float((curve - t.ours[sub, 1:]).abs().max()), note=what)


def _operator_costs(t: Timing, bound_per_row: float) -> None:
    """Every curve under each of the run's operators, and the memory used meanwhile."""
    job, device = t.job, t.device
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = 2 * len(job.ids) * t.interior  # insertion's passes serve LeRF too
    for name, op in job.operators.items():
        seconds, _ = timed(lambda op=op, name=name: t.harness(op, job.references[name],
                                                              ("deletion", "insertion", "lerf")),
                           device, t.cfg.repeats, warmup=True)
        t.record("operators", name, seconds=seconds, rows=rows, images=len(job.ids),
                 bound_seconds=rows * bound_per_row)
    t.record("memory", "chunk", rows=job.chunk, bytes_per_row=row_bytes(job.run.adapter, job.images),
             budget=parse_bytes(t.cfg.memory_budget) if t.cfg.memory_budget else None, peak_rss=peak_rss(),
             peak_gpu=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)


def _write_speed(t: Timing) -> dict[str, Any]:
    """``speed.md``, ``speed.csv`` and ``speed.json``, written together into ``cfg.out``."""
    df = pd.DataFrame(t.rows)
    job = t.job
    context = _context(t.cfg, job.run.adapter, job.run.meta, t.device, job.images, t.counts, job.chunk)
    markdown = render_speed(df, context)
    out = Path(t.cfg.out)
    write_run(out, {
        "speed.md": lambda f: f.write_text(markdown),
        "speed.csv": lambda f: df.to_csv(f, index=False),
        "speed.json": lambda f: write_json(f, context),
    }, marker="speed.json")
    return {"markdown": markdown, "rows": df, "out": out, "context": context}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _context(cfg: SpeedConfig, adapter: Any, meta: dict[str, Any], device: torch.device, images: Tensor,
             counts: Tensor, chunk: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    prov = provenance()
    return {
        **prov,
        "patchbench_version": __version__,
        "config": asdict(cfg),
        "model": meta.get("key", cfg.model),
        "input": list(images.shape[1:]),
        "patches": adapter.num_patches,
        "grid": list(adapter.grid),
        "points_per_curve": len(counts),
        "chunk_rows": chunk,
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "python": platform.python_version(), "platform": platform.platform()},
        "packages": {k: v for k, v in {**prov["packages"], "quantus": _version("quantus")}.items() if v},
    }


def render_speed(df: pd.DataFrame, ctx: dict[str, Any]) -> str:
    """The Markdown report, rendered from the tidy rows (tables by :func:`tables.markdown`)."""
    m = ctx["machine"]
    lines = [
        "# patchbench speed",
        "",
        f"Model `{ctx['model']}`, input {'x'.join(map(str, ctx['input']))}, {ctx['patches']} patches "
        f"({ctx['grid'][0]}x{ctx['grid'][1]}); {ctx['points_per_curve']} points per curve. "
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, device {m['device']}. "
        f"Packages: " + ", ".join(f"{k} {v}" for k, v in ctx["packages"].items() if v) + ".",
        "",
    ]
    same = df[df["table"] == "same_work"].set_index("item")
    if "patchbench" in same.index:
        lines += ["## The same work", "", SAME_WORK_NOTE, "", markdown(_same_work_table(same), None),
                  *_goal_lines(same), ""]
        lines += [f"- {item}: {r['note']}" for item, r in same.iterrows() if isinstance(r["note"], str)]
        lines.append("")
    ops = df[df["table"] == "operators"]
    if len(ops):
        lines += ["## Every curve, by operator", "",
                  "Deletion, insertion and LeRF (LeRF reuses insertion's passes), probability and KL.", "",
                  markdown(_operators_table(ops), None),
                  "`drop` leaves removed tokens out of the sequence, so its rows are shorter than a full "
                  "forward pass; the bound counts full-length passes.", ""]
    att = df[df["table"] == "attribution"]
    if len(att):
        rows = [[r["item"], Cell(r["ms_per_image"], ".2f")] for _, r in att.iterrows()]
        lines += [markdown(Table("Attribution, per method", ["method", "ms per image"], rows), "##")]
    mem = df[df["table"] == "memory"]
    if len(mem):
        r = mem.iloc[0]
        budget = "none (the device default)" if pd.isna(r.get("budget")) else format_bytes(r["budget"])
        gpu = "" if pd.isna(r.get("peak_gpu")) else f"; peak GPU memory {format_bytes(r['peak_gpu'])}"
        lines += ["## Memory", "",
                  f"Memory budget: {budget}; estimated {format_bytes(r['bytes_per_row'])} per row; "
                  f"{int(r['rows'])} rows per forward pass. Peak resident memory of the process while "
                  f"scoring every curve: {format_bytes(r['peak_rss'])}{gpu}.", ""]
    rates = df[df["table"] == "forward_rate"]
    if len(rates):
        rows = [[int(r["item"]), Cell(r["rows_per_second"], ".0f")] for _, r in rates.iterrows()]
        lines += [markdown(Table("The bare model's throughput", ["batch", "rows per second"], rows), "##")]
    lines.append(f"patchbench {ctx['packages'].get('patchbench')}, commit {ctx.get('git_commit')}"
                 f"{' (with uncommitted changes)' if ctx.get('git_dirty') else ''}.")
    return "\n".join(lines) + "\n"


SAME_WORK_NOTE = (
    "Every row computes the deletion curve of p(target) for the same images and maps, removing one "
    "more whole patch per step with a constant baseline (0 in the model's input space), and every "
    "curve is checked against patchbench's (last column). Forward rows count the model's forward "
    "passes: the clean and the all-removed points are shared with every method in a benchmark, "
    "so they are not counted for patchbench; Quantus evaluates the last point itself.")


def _same_work_table(same: pd.DataFrame) -> Table:
    ours = same.loc["patchbench", "seconds"] / same.loc["patchbench", "images"]
    bound = same.loc["forward bound", "seconds"] / same.loc["forward bound", "images"]
    rows = []
    for item, r in same.iterrows():
        if pd.isna(r.get("seconds")):
            rows.append([item, *[""] * 6, r["note"]])
            continue
        per_image = r["seconds"] / r["images"]
        speedup = "" if item in ("forward bound", "patchbench") else Cell(per_image / ours, ".1f", suffix="×")
        rows.append([item, int(r["images"]), int(r["rows"]), Cell(r["seconds"], ".2f"),
                     Cell(1000 * per_image, ".1f"), Cell(per_image / bound, ".2f"), speedup,
                     "" if pd.isna(r.get("max_abs_diff")) else Cell(r["max_abs_diff"], ".1e")])
    header = ["run", "images", "forward rows", "time (s)", "ms per image", "× forward bound",
              "patchbench speed-up", "max abs diff of the curve"]
    return Table("The same work", header, rows)


def _goal_lines(same: pd.DataFrame) -> list[str]:
    ours = same.loc["patchbench"]
    ratio = ours["seconds"] / same.loc["forward bound", "seconds"]
    lines = [f"patchbench / forward bound: **{ratio:.2f}** (goal ≤ {GOAL_BOUND_RATIO}: "
             f"{'met' if ratio <= GOAL_BOUND_RATIO else 'not met'})."]
    for item, r in same.iterrows():
        if item.startswith("Quantus") and not pd.isna(r.get("seconds")):
            speedup = (r["seconds"] / r["images"]) / (ours["seconds"] / ours["images"])
            lines.append(f"Speed-up over {item}: **{speedup:.1f}×** (goal ≥ {GOAL_SPEEDUP:.0f}×: "
                         f"{'met' if speedup >= GOAL_SPEEDUP else 'not met'}).")
    return lines


def _operators_table(ops: pd.DataFrame) -> Table:
    pixel = ops[~ops["item"].map(lambda n: OPERATORS.get(n).needs_tokens)]
    ref = pixel.iloc[0] if len(pixel) else ops.iloc[0]
    rows = [[r["item"], int(r["rows"]), Cell(r["seconds"], ".2f"),
             Cell(1000 * r["seconds"] / r["images"], ".1f"), Cell(r["seconds"] / r["bound_seconds"], ".2f"),
             Cell(r["seconds"] / ref["seconds"], ".2f")] for _, r in ops.iterrows()]
    header = ["operator", "forward rows", "time (s)", "ms per image", "× forward bound", f"× {ref['item']}"]
    return Table("Every curve, by operator", header, rows)
