"""The benchmark run: models x datasets x methods x operators -> tidy rows -> files."""

from __future__ import annotations

import functools
import hashlib
import inspect
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from patchbench import __version__
from patchbench.bench.chunks import ChunkStore, MissingChunkError
from patchbench.bench.config import BenchConfig
from patchbench.bench.distributed import World, close_world, init_world
from patchbench.bench.guard import ModelChangedError, WeightGuard, WeightsLostError
from patchbench.bench.report import Gallery, write_report
from patchbench.bench.results import (
    agreement_table,
    check_replaceable,
    ground_truth_check,
    ground_truth_table,
    normalised_tables,
    operator_agreement,
    plot_curves,
    render_markdown,
    report_sections,
    sanity_table,
    summarise,
    wide_leaderboard,
    write_run,
)
from patchbench.bench.sanity import randomisation_stages, randomised_correlations, sanity_rows
from patchbench.context import RunContext, options_from_run
from patchbench.datasets import DATASETS, create_dataset
from patchbench.datasets.base import select_samples
from patchbench.datasets.files import FileDataset
from patchbench.memory import choose_chunk, parse_bytes
from patchbench.methods import METHODS, create_method
from patchbench.metrics import (
    CURVES,
    faithfulness_curves,
    log_probs,
    patch_auroc,
    pointing_game,
    prepare_reference,
    relevance_mass,
)
from patchbench.metrics.faithfulness import Curves
from patchbench.models import OPERATORS, create_operator, load_model
from patchbench.models.hub import create_model, resize_for_model
from patchbench.models.zoo import MODELS, TrainConfig
from patchbench.utils import (
    autocast,
    provenance,
    resolve_device,
    seed_everything,
    stable_hash,
    sync,
    write_json,
)

SCORE_COLUMNS = ["model", "dataset", "method", "operator", "metric", "sample_id", "value"]


def run_benchmark(cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    """Runs the benchmark and writes ``results/<run>/``; returns the tables and paths.

    Files: ``scores.csv`` (one row per image per metric), ``curves.csv.gz`` (long form),
    ``leaderboard.md``/``.csv``, ``curves.png`` and ``run.json`` (config, seeds, models,
    timings, git commit, package versions). They are written together or not at all.

    Under torchrun every rank scores its share of the images and rank 0 writes the merged
    results, the same as a single process would (the other ranks return empty tables).
    """
    plugin_problems = _load_plugins(cfg)
    cfg.validate()
    check_replaceable(Path(cfg.results_dir) / cfg.run)  # before minutes of work, not after
    world, device_name = init_world(cfg.device)
    out = _run(cfg, world, resolve_device(device_name), plugin_problems, progress and world.is_writer)
    close_world(world)
    return out


def _run(cfg: BenchConfig, world: World, device: torch.device, plugin_problems: list[str],
         progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    seed_everything(cfg.seed)
    warnings: list[str] = []

    def warn(msg: str) -> None:  # reported even with --quiet, and kept in run.json
        warnings.append(msg)
        tqdm.write(msg, file=sys.stderr)

    store = ChunkStore(Path(cfg.results_dir) / ".chunks", cfg.overwrite, warn)
    scores, curves, timing, models, sample_ids = [], [], [], {}, {}
    checks: list[dict[str, Any]] = []  # the ground-truth mask scored as a map (metric check)
    sanity: list[dict[str, Any]] = []  # model-randomisation check rows
    galleries: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    train_logs: dict[str, Path] = {}
    for dataset in cfg.datasets:
        with world.local_rank0_first():  # one rank per node trains into the cache
            adapter, meta = _load_model(cfg, dataset, progress)
        _check_token_needs(cfg, adapter)
        adapter.to(device)
        guard = WeightGuard(adapter.model)  # every method must leave the weights as they are
        meta["weights_digest"] = guard.digest
        models[dataset] = meta
        pixels, labels, gt_pixels, ids = _load_samples(cfg, dataset, adapter)
        sample_ids[dataset] = ids
        if gt_pixels.any() and tuple(pixels.shape[-2:]) != adapter.img_size:
            raise ValueError(f"{dataset} images are {tuple(pixels.shape[-2:])}, the model takes "
                             f"{adapter.img_size}: ground-truth masks would not line up with patches")
        all_images = _to_device(adapter.prepare(pixels), device)
        truth = (adapter.pixel_to_patch(gt_pixels) if gt_pixels.any()
                 else torch.zeros(len(ids), *adapter.grid, dtype=torch.bool))
        part = world.shard(len(ids))  # everything below is this rank's share of the images
        images, labels, truth, ids = all_images[part], labels[part].to(device), truth[part], ids[part]
        if not ids:
            raise ValueError(f"{world.size} ranks for {len(sample_ids[dataset])} images of {dataset}: "
                             "start fewer processes or evaluate more images")
        budget = parse_bytes(cfg.memory_budget) if cfg.memory_budget else None
        chunk = choose_chunk(adapter, images, budget, cfg.chunk_size)
        meta["chunk_size"] = chunk
        with autocast(device, cfg.autocast):
            logp_clean = log_probs(adapter, images, chunk)
        pred = logp_clean.argmax(1)
        correct, seen = world.all_sum([(pred == labels).sum().item(), len(ids)])
        meta["eval_accuracy"] = round(correct / seen, 4)
        target = pred if cfg.target == "prediction" else labels
        gallery = _gallery_start(cfg, dataset, adapter, pixels[part], labels, pred, truth, ids)
        model_key = meta["key"]
        base = {"model": model_key, "dataset": dataset}
        seeds = torch.tensor(ids)
        # each method and operator takes what it needs from the run through its own hook
        run = RunContext(cfg, dataset, adapter, meta, train_logs, progress, world.local_rank0_first)
        method_options = {m: options_from_run(METHODS.get(m), run, cfg.method_options.get(m, {}))
                          for m in cfg.methods}
        operators = {name: _create_operator(name, run) for name in cfg.operators}
        del all_images
        meta["operators"] = {name: op.config() for name, op in operators.items()}
        with autocast(device, cfg.autocast):
            references = {name: prepare_reference(adapter, op, images, seeds, chunk, logp_clean)
                          for name, op in operators.items()}
        data_key = {"model": model_key, "weights": guard.digest, "dataset": dataset,
                    "source": _data_source(cfg, dataset),
                    "sample_ids": stable_hash(ids, 24), "target": cfg.target,
                    "precision": [device.type, cfg.autocast], "version": __version__,
                    "code": source_digest(*CORE_SOURCES)}
        scored: list[str] = []  # the methods that did not fail, for the checks
        n_sanity = min(cfg.sanity_images, len(ids)) if world.rank == 0 else 0
        for method_name in cfg.methods:
            try:
                rows, frames, ms, maps = _score_method(
                    cfg, store, data_key, adapter, guard, method_name, method_options.get(method_name, {}),
                    images, target, truth, operators, references, base, ids, chunk, progress)
            except (MissingChunkError, KeyboardInterrupt, WeightsLostError):
                raise
            except Exception as e:  # one method's failure must not cost the others' results
                reason = f"{type(e).__name__}: {e}".splitlines()[0]
                failures.append({"dataset": dataset, "method": method_name, "error": reason})
                warn(f"patchbench: method {method_name!r} failed on {dataset}: {reason}")
                continue
            scores += rows
            curves += frames
            scored.append(method_name)
            if gallery:
                gallery["maps"][method_name] = maps[:len(gallery["ids"])].cpu()
            timing.append({"dataset": dataset, "method": method_name, "ms_per_image": ms,
                           "images": len(ids)})
        if n_sanity >= 2 and scored:
            try:
                sanity += _sanity_rows(cfg, store, data_key, adapter, guard, method_options, scored,
                                       images[:n_sanity], target[:n_sanity], base, warn, progress)
            except ModelChangedError as e:
                warn(f"patchbench: sanity check on {dataset} skipped: {e}")
        if truth.any() and "random" in scored:  # the check compares the mask with random
            checks += _ground_truth_rows(cfg, store, data_key, adapter, images, target, truth,
                                         operators, references, base, ids, chunk, progress)
        if gallery:
            galleries.append(gallery)
    parts = world.gather({"scores": scores, "curves": curves, "timing": timing, "failures": failures,
                          "warnings": warnings, "chunks": [store.reused, store.computed],
                          "checks": checks, "galleries": galleries, "sanity": sanity})
    if not world.is_writer:
        return {"markdown": "", "run_dir": Path(cfg.results_dir) / cfg.run, "failures": world.broadcast(None)}
    scores_df, curves_df, timing_df, failures_df = _merge(parts, cfg, sample_ids)
    failures = failures_df.to_dict("records")
    world.broadcast(failures)
    summary = summarise(scores_df, seed=cfg.seed) if len(scores_df) else pd.DataFrame()
    board = wide_leaderboard(summary) if len(summary) else pd.DataFrame()
    truth_df = pd.DataFrame([r for p in parts for r in p["checks"]], columns=SCORE_COLUMNS).dropna()
    check_df = ground_truth_check(truth_df, scores_df)
    sanity_df = pd.DataFrame([r for p in parts for r in p["sanity"]])
    agreement_df = operator_agreement(summary) if len(summary) else pd.DataFrame()
    extra = [*normalised_tables(summary)] if len(summary) else []
    if len(agreement_df):
        extra.append(agreement_table(agreement_df))
    if len(check_df):
        extra.append(ground_truth_table(check_df))
    if len(sanity_df):
        extra += sanity_table(sanity_df)
    flagged = check_df[check_df.verdict == "flag"]
    markdown = render_markdown(summary, timing_df, failures_df, extra, flagged)
    run = {
        "config": asdict(cfg),
        "seeds": {"run": cfg.seed, "model_training": cfg.seed, "sample_selection": cfg.seed,
                  "noise_operator": cfg.seed, "random_method": cfg.seed},
        "models": models,
        "sample_ids": sample_ids,
        "timing": {"total_seconds": round(time.perf_counter() - started, 1),
                   "attribution_ms_per_image": timing_df.to_dict("records")},
        "patchbench_version": __version__,
        "failures": failures,
        "warnings": list(dict.fromkeys(w for p in parts for w in p["warnings"])),
        "plugin_problems": plugin_problems,
        "chunks": {"root": str(store.root), "reused": sum(p["chunks"][0] for p in parts),
                   "computed": sum(p["chunks"][1] for p in parts)},
        "world": {"ranks": world.size, "device": str(device)},
        **provenance(),
    }
    curves_png = plot_curves(curves_df) if len(curves_df) else b""
    sections = report_sections(cfg, summary, timing_df, failures_df, flagged, extra, check_df,
                               sanity_df, curves_png, _merge_galleries(parts, cfg))
    run_dir = Path(cfg.results_dir) / cfg.run
    write_run(run_dir, {
        "scores.csv": lambda p: scores_df.to_csv(p, index=False, float_format="%.6g"),
        "curves.csv.gz": lambda p: curves_df.to_csv(p, index=False, float_format="%.6g",
                                                    compression="gzip"),
        "leaderboard.csv": lambda p: board.to_csv(p, index=False, float_format="%.6g"),
        "leaderboard.md": lambda p: p.write_text(f"# patchbench leaderboard: {cfg.run}\n\n{markdown}"),
        **({"curves.png": lambda p: p.write_bytes(curves_png)} if curves_png else {}),
        "report.html": lambda p: write_report(p, f"patchbench report: {cfg.run}", sections, run),
        **({"metric_check.csv": lambda p: check_df.to_csv(p, index=False, float_format="%.6g")}
           if len(check_df) else {}),
        **({"sanity.csv": lambda p: sanity_df.to_csv(p, index=False, float_format="%.6g")}
           if len(sanity_df) else {}),
        **({"rank_stability.csv": lambda p: agreement_df.to_csv(p, index=False, float_format="%.6g")}
           if len(agreement_df) else {}),
        **({"failures.csv": lambda p: failures_df.to_csv(p, index=False)} if failures else {}),
        "run.json": lambda p: write_json(p, run),
        **{name: (lambda p, src=src: shutil.copyfile(src, p)) for name, src in train_logs.items()
           if src.exists()},
    })
    return {"markdown": markdown, "scores": scores_df, "curves": curves_df, "summary": summary,
            "leaderboard": board, "run_dir": run_dir, "run": run, "failures": failures,
            "metric_check": check_df, "sanity": sanity_df, "rank_stability": agreement_df}


def _merge_galleries(parts: list[dict[str, Any]], cfg: BenchConfig) -> list[Gallery]:
    """One gallery per dataset: the first ``gallery_size`` images over the ranks, in order."""
    out = []
    for dataset in cfg.datasets:
        pieces = [g for p in parts for g in p["galleries"] if g["dataset"] == dataset]
        if not pieces:
            continue
        n = cfg.gallery_size
        methods = [m for m in cfg.methods if all(m in g["maps"] for g in pieces)]
        truth = (torch.cat([g["truth"] for g in pieces])[:n]
                 if all(g["truth"] is not None for g in pieces) else None)
        out.append(Gallery(
            title=dataset, images=torch.cat([g["pixels"] for g in pieces])[:n],
            maps={m: torch.cat([g["maps"][m] for g in pieces])[:n] for m in methods},
            truth=truth, captions=[c for g in pieces for c in g["captions"]][:n]))
    return out


def _merge(parts: list[dict[str, Any]], cfg: BenchConfig, sample_ids: dict[str, list[int]]
           ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Every rank's rows as the tables one process would have written (the same order).

    A method that failed on any rank is reported once and its rows from the other ranks are
    dropped, so a table never shows a score over part of the images.
    """
    failures_df = pd.DataFrame([f for p in parts for f in p["failures"]],
                               columns=["dataset", "method", "error"])
    failures_df = failures_df.drop_duplicates(["dataset", "method"], ignore_index=True)
    failed = set(zip(failures_df["dataset"], failures_df["method"]))

    def ok(df: pd.DataFrame) -> pd.DataFrame:
        if not failed or not len(df):
            return df
        keep = [(d, m) not in failed for d, m in zip(df["dataset"], df["method"])]
        return df[keep]

    scores_df = ok(pd.DataFrame([r for p in parts for r in p["scores"]], columns=SCORE_COLUMNS))
    scores_df = _canonical(scores_df, cfg, sample_ids, ["metric"])
    scores_df = scores_df.dropna(subset=["value"])  # AUROC is undefined for empty/full masks
    frames = [f for p in parts for f in p["curves"]]
    curves_df = (_canonical(ok(pd.concat(frames, ignore_index=True)), cfg, sample_ids,
                            ["curve", "quantity"], "step") if frames else pd.DataFrame())
    timing = ok(pd.DataFrame([t for p in parts for t in p["timing"]],
                             columns=["dataset", "method", "ms_per_image", "images"]))
    timing["ms"] = timing["ms_per_image"] * timing["images"]
    timing_df = timing.groupby(["dataset", "method"], sort=False, as_index=False)[["ms", "images"]].sum()
    timing_df["ms_per_image"] = timing_df["ms"] / timing_df["images"]
    return scores_df, curves_df, timing_df[["dataset", "method", "ms_per_image"]], failures_df


def _canonical(df: pd.DataFrame, cfg: BenchConfig, sample_ids: dict[str, list[int]],
               inner: list[str], last: str | None = None) -> pd.DataFrame:
    """Rows sorted by dataset, method and operator as configured, then ``inner`` columns in
    order of first appearance, then sample position, then ``last``: one process's order."""
    if not len(df):
        return df
    keys = {"dataset": df["dataset"].map({d: i for i, d in enumerate(cfg.datasets)}),
            "method": df["method"].map({m: i for i, m in enumerate(cfg.methods)}),
            "operator": df["operator"].map({o: i for i, o in enumerate(["-", *cfg.operators])})}
    for col in inner:
        keys[col] = df[col].map({v: i for i, v in enumerate(pd.unique(df[col]))})
    position = pd.Series(0, index=df.index)
    for d, ids in sample_ids.items():
        rows = df["dataset"] == d
        position[rows] = df.loc[rows, "sample_id"].map({s: i for i, s in enumerate(ids)})
    keys["sample"] = position
    if last:
        keys[last] = df[last]
    order = np.lexsort([k.to_numpy() for k in reversed(keys.values())])
    return df.iloc[order].reset_index(drop=True)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copies to the GPU from pinned memory (asynchronously); a no-op on the CPU."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _score_method(cfg: BenchConfig, store: ChunkStore, data_key: dict[str, Any], adapter: Any,
                  guard: WeightGuard, name: str, options: dict[str, Any], images: Tensor, target: Tensor,
                  truth: Tensor,
                  operators: dict[str, Any], references: dict[str, Any], base: dict[str, str],
                  ids: list[int], chunk: int, progress: bool
                  ) -> tuple[list[dict[str, Any]], list[pd.DataFrame], float, Tensor]:
    """One method on one dataset: maps, then curves under every operator, each a stored chunk.

    Returns:
        Score rows, curve frames, attribution ms per image and the maps ``[B, Hp, Wp]``.
    """
    method = create_method(name, adapter, **options)
    guard.check(f"method {name!r}")
    device = images.device
    maps_key = {"kind": "maps", **data_key, "method": method.config(),
                "method_code": file_digest(inspect.getsourcefile(type(method)))}

    def attribute() -> dict[str, Tensor]:
        t0 = time.perf_counter()
        with autocast(device, cfg.autocast):
            maps = torch.cat([
                method.attribute(x, t) for x, t in tqdm(
                    list(zip(images.split(cfg.batch_size), target.split(cfg.batch_size))),
                    desc=f"{base['dataset']}: {name}", disable=not progress, leave=False)])
        sync(device)
        guard.check(f"method {name!r}")  # raising here stores nothing
        return {"maps": maps, "seconds": torch.tensor(time.perf_counter() - t0, dtype=torch.float64)}

    got = store.get(maps_key, attribute)
    maps = got["maps"].to(device)
    rows = []
    if truth.any():  # localisation scores only where the dataset has ground truth
        m = maps.cpu()
        rows += _rows(base, name, "-", {"auroc": patch_auroc(m, truth),
                                        "pointing_game": pointing_game(m, truth),
                                        "relevance_mass": relevance_mass(m, truth)}, ids)
    more, frames = _curve_rows(cfg, store, maps_key, adapter, maps, images, target, operators,
                               references, base, name, ids, chunk, progress)
    return rows + more, frames, 1000 * float(got["seconds"]) / len(ids), maps


def _curve_rows(cfg: BenchConfig, store: ChunkStore, maps_key: dict[str, Any], adapter: Any,
                maps: Tensor, images: Tensor, target: Tensor, operators: dict[str, Any],
                references: dict[str, Any], base: dict[str, str], name: str, ids: list[int],
                chunk: int, progress: bool) -> tuple[list[dict[str, Any]], list[pd.DataFrame]]:
    """Faithfulness scores and curves of ``maps`` under every operator (stored chunks)."""
    device = images.device
    rows, frames = [], []
    for op_name, op in operators.items():
        curves_key = {**maps_key, "kind": "curves", "operator": op.config(), "steps": cfg.steps,
                      "harness_code": source_digest(*HARNESS_SOURCES),
                      "operator_code": file_digest(inspect.getsourcefile(type(op)))}

        def score(op: Any = op, op_name: str = op_name) -> dict[str, Tensor]:
            with autocast(device, cfg.autocast):
                c = faithfulness_curves(adapter, op, images, target, maps, references[op_name],
                                        cfg.steps, chunk, progress=progress)
            return {"x": c.x, **{f"prob_{k}": v for k, v in c.prob.items()},
                    **{f"kl_{k}": v for k, v in c.kl.items()}}

        p = store.get(curves_key, score)
        c = Curves(p["x"], {k: p[f"prob_{k}"] for k in CURVES}, {k: p[f"kl_{k}"] for k in CURVES})
        rows += _rows(base, name, op_name, c.scores(), ids)
        frames.append(_curve_frame(base, name, op_name, c, ids))
    return rows, frames


def _sanity_rows(cfg: BenchConfig, store: ChunkStore, data_key: dict[str, Any], adapter: Any,
                 guard: WeightGuard, method_options: dict[str, dict[str, Any]], names: list[str],
                 images: Tensor, target: Tensor, base: dict[str, str], warn: Any,
                 progress: bool) -> list[dict[str, Any]]:
    """Cascading model randomisation on the first images: one stored chunk per dataset.

    Each stage re-initialises one more part of the model, from the head down; every method's
    maps on that copy are compared with its maps on the trained model (Spearman per image).
    Both are computed here under one private seed, so a method's own randomness is the same
    on the trained and the randomised model (the run's maps were drawn with another state).
    """
    stages = randomisation_stages(adapter)
    key = {"kind": "sanity", **data_key, "images": len(images), "seed": cfg.seed, "stages": stages,
           "sanity_code": source_digest("bench/sanity.py"),
           "methods": {m: {"options": method_options.get(m, {}),
                           "code": file_digest(inspect.getsourcefile(METHODS.get(m)))} for m in names}}

    def compute() -> dict[str, Tensor]:
        factories = {m: functools.partial(create_method, m, **method_options.get(m, {})) for m in names}
        with autocast(images.device, cfg.autocast):
            rho, errors = randomised_correlations(
                adapter, factories, images, target, cfg.seed, progress, cfg.batch_size,
                desc=f"{base['dataset']}: sanity check")
        guard.check("a method in the sanity check")
        for name, why in errors.items():  # the verdict says "error"; the reason is told once
            warn(f"patchbench: sanity check of {name!r} on {base['dataset']} failed: {why}")
        return {"spearman": rho}

    rho = store.get(key, compute)["spearman"]
    return sanity_rows(rho, names, stages, {**base, "images": len(images)}, cfg.seed)


GROUND_TRUTH = "ground-truth mask"


def _ground_truth_rows(cfg: BenchConfig, store: ChunkStore, data_key: dict[str, Any], adapter: Any,
                       images: Tensor, target: Tensor, truth: Tensor, operators: dict[str, Any],
                       references: dict[str, Any], base: dict[str, str], ids: list[int], chunk: int,
                       progress: bool) -> list[dict[str, Any]]:
    """Faithfulness scores of the ground-truth mask used as a map: the metric check.

    Object patches rank first (ties by patch index), so a metric that measures faithfulness
    on this data should score the mask better than the ``random`` control.
    """
    maps = truth.to(images.device).float()
    key = {"kind": "maps", **data_key, "method": {"name": GROUND_TRUTH}}
    rows, _ = _curve_rows(cfg, store, key, adapter, maps, images, target, operators, references,
                          base, GROUND_TRUTH, ids, chunk, progress)
    return rows


# Chunk keys hold the source their results depend on, and nothing else: editing the report,
# the tables, the CLI or the statistics keeps every stored map and curve. Beyond these, a
# maps key holds the method's own file, a curves key the operator's (plugins' too).
CORE_SOURCES = ("models/adapter.py", "models/hf.py", "methods/base.py", "datasets/base.py",
                "datasets/synthetic.py", "datasets/files.py", "utils.py")  # the model, the data
HARNESS_SOURCES = ("metrics/faithfulness.py", "metrics/functional.py")  # curves and their scores


def source_digest(*paths: str) -> str:
    """Hash of patchbench source files, given relative to the package (``models/adapter.py``)."""
    root = Path(__file__).resolve().parents[1]
    return stable_hash([file_digest(str(root / p)) for p in paths], 16)


def file_digest(path: str | None) -> str | None:
    """Hash of one source file (a method's or an operator's, plugins' included)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else None


def _data_source(cfg: BenchConfig, dataset: str) -> dict[str, Any] | None:
    """Where a dataset on disk was read from (part of the chunk keys); None for generated data."""
    if not issubclass(DATASETS.get(dataset), FileDataset):
        return None
    root = str(Path(cfg.data_root).resolve()) if cfg.data_root else None
    return {"data_root": root, **cfg.dataset_options.get(dataset, {})}


def _load_model(cfg: BenchConfig, dataset: str, progress: bool) -> tuple[Any, dict[str, Any]]:
    """An embedded model trained for ``dataset``, any timm model by name, or ``hf:<id>``."""
    if cfg.model in MODELS:
        return load_model(cfg.model, dataset, TrainConfig(seed=cfg.seed), progress=progress)
    return create_model(cfg.model, cfg.pretrained, cfg.checkpoint)


def _load_plugins(cfg: BenchConfig) -> list[str]:
    """Installed plugins and ``cfg.plugins``; problems are reported and the run goes on."""
    from patchbench.methods import plugins

    plugins.load_all(cfg.plugins)
    return plugins.problems_of(cfg.plugins)


def _check_token_needs(cfg: BenchConfig, adapter: Any) -> None:
    """Refuses, before any work, methods and operators a non-ViT model cannot serve."""
    if adapter.is_vit:
        return
    from patchbench.models.adapter import NotAViTError

    methods = [m for m in cfg.methods if METHODS.get(m).needs_tokens]
    operators = [o for o in cfg.operators if OPERATORS.get(o).needs_tokens]
    if methods or operators:
        ok_m = [m for m in METHODS.list() if not METHODS.get(m).needs_tokens]
        ok_o = [o for o in OPERATORS.list() if not OPERATORS.get(o).needs_tokens]
        raise NotAViTError(
            f"{cfg.model} is not a vision transformer, so it has no patch tokens for "
            f"{', '.join(methods + operators)}. On any model you can use the methods "
            f"{', '.join(ok_m)} and the operators {', '.join(ok_o)} "
            f"(e.g. --methods {','.join(ok_m)} --operators {','.join(ok_o[:2])}).")


def _load_samples(cfg: BenchConfig, dataset: str, adapter: Any
                  ) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Pixels, labels, ground-truth masks and sample ids: ``n_images`` stratified over classes.

    Images read from disk are brought to the model's input by its own transform as they
    are read, so a folder of images of any size and mode works."""
    if issubclass(DATASETS.get(dataset), FileDataset):
        ds = create_dataset(dataset, "test", data_root=cfg.data_root, limit=cfg.n_images, seed=cfg.seed,
                            **cfg.dataset_options.get(dataset, {}))
        ds.transform = adapter.pixel_transform()
        return (*ds.tensors(), list(ds.indices))
    pixels, labels, masks = create_dataset(dataset, "test", seed=cfg.seed).tensors()
    ids = select_samples(labels, cfg.n_images, cfg.seed)
    return pixels[ids], labels[ids], masks[ids], ids


def _create_operator(name: str, run: RunContext) -> Any:
    options = options_from_run(OPERATORS.get(name), run, run.cfg.operator_options.get(name, {}))
    try:
        return create_operator(name, **options)
    except (TypeError, ValueError) as e:  # a bad value in [operator_options.<name>]
        raise ValueError(f"operator {name!r} with options {options}: {e}") from None


def _gallery_start(cfg: BenchConfig, dataset: str, adapter: Any, pixels: Tensor, labels: Tensor,
                   pred: Tensor, truth: Tensor, ids: list[int]) -> dict[str, Any] | None:
    """The first ``gallery_size`` images of this rank's share, for the report's gallery;
    the methods' maps are added as they are computed."""
    n = min(cfg.gallery_size, len(ids))
    if not n:
        return None
    shown = pixels[:n].float()
    if tuple(shown.shape[-2:]) != adapter.img_size:  # shown as the model sees it, like the maps
        data = adapter.data_config
        shown = resize_for_model(shown, adapter.img_size, data.get("crop_pct", 1.0),
                                 data.get("interpolation", "bicubic")).clamp(0, 1)
    return {"dataset": dataset, "ids": ids[:n], "pixels": shown,
            "truth": truth[:n].cpu() if truth.any() else None,
            "captions": [f"#{i} · label {int(y)} · pred {int(p)}"
                         for i, y, p in zip(ids[:n], labels[:n].tolist(), pred[:n].tolist())],
            "maps": {}}


def _rows(base: dict[str, str], method: str, operator: str, values: dict[str, Tensor],
          ids: list[int]) -> list[dict[str, Any]]:
    return [{**base, "method": method, "operator": operator, "metric": metric,
             "sample_id": sid, "value": float(v)}
            for metric, tensor in values.items() for sid, v in zip(ids, tensor.tolist())]


def _curve_frame(base: dict[str, str], method: str, operator: str, c: Any,
                 ids: list[int]) -> pd.DataFrame:
    frames = []
    s = len(c.x)
    for curve in CURVES:
        for quantity, values in (("prob", c.prob[curve]), ("kl", c.kl[curve])):
            frames.append(pd.DataFrame({
                "curve": curve, "quantity": quantity,
                "sample_id": torch.tensor(ids).repeat_interleave(s).numpy(),
                "step": torch.arange(s).repeat(len(ids)).numpy(),
                "x": c.x.repeat(len(ids)).numpy(),
                "value": values.flatten().cpu().numpy()}))
    df = pd.concat(frames, ignore_index=True)
    for k, v in reversed({**base, "method": method, "operator": operator}.items()):
        df.insert(0, k, v)
    return df
