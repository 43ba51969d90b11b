"""The benchmark run: models x datasets x methods x operators -> tidy rows -> files."""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

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
    stages_table,
    summarise,
    transfer_table,
    wide_leaderboard,
    with_seed_ranges,
    write_run,
)
from patchbench.bench.sanity import randomisation_stages, randomised_correlations, sanity_rows
from patchbench.context import RunContext, options_from_run
from patchbench.datasets import DATASETS, create_dataset
from patchbench.datasets.base import select_samples
from patchbench.datasets.files import FileDataset
from patchbench.log import get_logger
from patchbench.memory import choose_chunk, parse_bytes
from patchbench.methods import METHODS, Method, create_method, plugins
from patchbench.methods.precomputed import register_maps_file
from patchbench.metrics import (
    CURVES,
    clean_logits,
    faithfulness_curves,
    localisation_scores,
    prepare_reference,
)
from patchbench.metrics.faithfulness import QUANTITIES, Curves
from patchbench.models import OPERATORS, create_operator, load_model
from patchbench.models.adapter import NotAViTError, resize_for_model
from patchbench.models.hub import create_model
from patchbench.models.zoo import MODELS, TrainConfig
from patchbench.utils import (
    autocast,
    file_digest,
    provenance,
    resolve_device,
    seed_everything,
    stable_hash,
    sync,
    write_json,
)

LOG = get_logger(__name__)
SCORE_COLUMNS = ["model", "dataset", "method", "operator", "metric", "sample_id", "value"]


def run_benchmark(cfg: BenchConfig, progress: bool = True, given: Given | None = None) -> dict[str, Any]:
    """Runs the benchmark and writes ``results/<run>/``; returns the tables and paths.

    Files: ``scores.csv`` (one row per image per metric), ``curves.csv.gz`` (long form),
    ``leaderboard.md``/``.csv``, ``curves.png`` and ``run.json`` (config, seeds, models,
    timings, git commit, package versions). They are written together or not at all.

    Under torchrun every rank scores its share of the images and rank 0 writes the merged
    results, the same as a single process would (the other ranks return empty tables).
    ``given`` holds objects that stand in for names (see :func:`patchbench.evaluate`).
    """
    plugin_problems = _load_plugins(cfg)
    for path in cfg.maps:  # maps computed elsewhere are scored as methods maps:<file stem>
        name = register_maps_file(path)
        cfg.methods = cfg.methods if name in cfg.methods else (*cfg.methods, name)
    given = given or Given()
    cfg.validate(given=given.names(cfg))
    check_replaceable(Path(cfg.results_dir) / cfg.run)  # before minutes of work, not after
    world, device_name = init_world(cfg.device)
    out = _run(cfg, world, resolve_device(device_name), plugin_problems, progress and world.is_writer,
               given)
    close_world(world)
    return out


@dataclass
class Given:
    """Objects that stand in for names in a run (Python callers): a model, samples, method
    instances or classes, operator instances. Whatever is not given is made from its name.

    Attributes:
        model: The adapter and its ``run.json`` record, or None.
        samples: Pixels ``[N, 3, H, W]`` in [0, 1], labels ``[N]``, pixel masks ``[N, H, W]``,
            sample ids, and what identifies them (part of the chunk keys), or None.
        methods: Name -> a :class:`Method` instance or class.
        operators: Name -> a removal operator instance.
    """

    model: tuple[Any, dict[str, Any]] | None = None
    samples: tuple[Tensor, Tensor, Tensor, list[int], dict[str, Any]] | None = None
    methods: dict[str, Any] = field(default_factory=dict)
    operators: dict[str, Any] = field(default_factory=dict)

    def names(self, cfg: BenchConfig) -> set[str]:
        """The config's names that stand for given objects (not looked up in registries)."""
        model = {cfg.model} if self.model else set()
        data = set(cfg.datasets) if self.samples else set()
        return model | data | set(self.methods) | set(self.operators)


@dataclass
class Part:
    """What one process computed: tidy rows, curves, checks and its log (gathered on rank 0)."""

    scores: list[dict[str, Any]] = field(default_factory=list)
    curves: list[pd.DataFrame] = field(default_factory=list)
    timing: list[dict[str, Any]] = field(default_factory=list)  # attribution ms per image
    failures: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)  # the ground-truth mask's scores
    sanity: list[dict[str, Any]] = field(default_factory=list)  # model-randomisation rows
    galleries: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)  # seconds per stage
    transfer: list[dict[str, Any]] = field(default_factory=list)  # trained for X, scored under Y
    seed_scores: list[dict[str, Any]] = field(default_factory=list)  # per training seed
    chunks: list[int] = field(default_factory=lambda: [0, 0])  # reused, computed

    def warn(self, msg: str) -> None:
        """Reported even with --quiet, and kept in run.json."""
        self.warnings.append(msg)
        LOG.warning(msg)

    @contextlib.contextmanager
    def stage(self, dataset: str, name: str) -> Iterator[None]:
        """Times one stage of the run (``run.json`` and the report say where the time went)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages.append({"dataset": dataset, "stage": name,
                                "seconds": round(time.perf_counter() - t0, 2)})


@dataclass
class Job:
    """One dataset of a run, prepared: the model and its guard, this process's share of the
    images with their targets and ground truth, the operators and their references, the
    methods' options, and the key the stored results are filed under."""

    run: RunContext
    guard: WeightGuard
    images: Tensor
    target: Tensor
    truth: Tensor
    ids: list[int]
    all_ids: list[int]
    chunk: int
    method_options: dict[str, dict[str, Any]]  # per operator for trained_for_operator methods
    operators: dict[str, Any]
    references: dict[str, Any]
    data_key: dict[str, Any]
    gallery: dict[str, Any] | None
    instances: dict[str, Any] = field(default_factory=dict)  # methods given as objects

    @property
    def cfg(self) -> BenchConfig:
        return self.run.cfg

    @property
    def base(self) -> dict[str, str]:
        return {"model": self.run.meta["key"], "dataset": self.run.dataset}

    def variants(self, name: str) -> list[Variant]:
        """The instances a method is scored with: one per operator it is trained for
        (``trained_for_operator``) times one per training seed (``trained``), or the one
        instance ``Variant(None, None)`` scored under every operator."""
        if name in self.instances:
            return [Variant(None, None)]
        return _variants(name, self.run, self.operators)

    def options(self, name: str, variant: Variant | None = None) -> dict[str, Any]:
        """The options to create method ``name`` with (as ``variant``)."""
        options = self.method_options.get(name, {})
        return options[variant] if variant is not None and variant in options else options


def _run(cfg: BenchConfig, world: World, device: torch.device, plugin_problems: list[str],
         progress: bool, given: Given) -> dict[str, Any]:
    """The run: prepare each dataset, execute each method on it, run the checks; then collect
    every process's part and write the run folder."""
    started = time.perf_counter()
    seed_everything(cfg.seed)
    part = Part()
    store = ChunkStore(Path(cfg.results_dir) / ".chunks", cfg.overwrite, part.warn)
    models, sample_ids, files = {}, {}, {}
    for dataset in cfg.datasets:
        job = prepare(cfg, dataset, device, world=world, files=files, part=part, progress=progress,
                      given=given)
        models[dataset], sample_ids[dataset] = job.run.meta, job.all_ids
        scored = [m for m in cfg.methods if _execute(job, m, store, part)]
        _check(job, scored, world, store, part)
    part.chunks = [store.reused, store.computed]
    parts = world.gather(vars(part))
    if not world.is_writer:
        return {"markdown": "", "run_dir": Path(cfg.results_dir) / cfg.run, "failures": world.broadcast(None)}
    t0 = time.perf_counter()
    out = _collect(parts, cfg, sample_ids, given)
    world.broadcast(out["failures"])
    out["stages"].append({"dataset": "-", "stage": "statistics and tables",
                          "seconds": round(time.perf_counter() - t0, 2)})
    run = _run_record(cfg, models, sample_ids, parts, out, plugin_problems, store, world, device, started)
    out.update(run=run, run_dir=_write(cfg, out, run, files))
    return out


def prepare(cfg: BenchConfig, dataset: str, device: torch.device, *, world: World | None = None,
            files: dict[str, Path] | None = None, part: Part | None = None, progress: bool = True,
            given: Given | None = None, timing_only: bool = False) -> Job:
    """Loads the model and the images, creates the operators (each taking what it needs from
    the run) and computes what every method's curves share.

    Args:
        cfg: The run's config (validated).
        dataset: One of ``cfg.datasets``.
        device: Where the model runs.
        world: This process among the ranks (default: the only one).
        files: Collects extra files for the run folder (training logs).
        part: Collects stage timings and warnings.
        progress: Progress bars.
        given: Objects standing in for names.
        timing_only: Only the components' cost will be measured (``patchbench speed``):
            methods and operators the model cannot serve are left out with a warning instead
            of stopping the run, and trained artifacts may be untrained stand-ins.
    """
    world, part, given = world or World(), part or Part(), given or Given()
    files = {} if files is None else files
    with part.stage(dataset, "model"), world.local_rank0_first():  # one rank per node trains
        adapter, meta = given.model or _load_model(cfg, dataset, progress)
    _check_token_needs(cfg, adapter, part.warn if timing_only else None)
    adapter.to(device)
    guard = WeightGuard(adapter.model)  # every method must leave the weights as they are
    meta["weights_digest"] = guard.digest
    with part.stage(dataset, "data"):
        pixels, labels, gt_pixels, all_ids, source = given.samples or (
            *_load_samples(cfg, dataset, adapter), _data_source(cfg, dataset))
    if gt_pixels.any() and tuple(pixels.shape[-2:]) != adapter.img_size:
        raise ValueError(f"{dataset} images are {tuple(pixels.shape[-2:])}, the model takes "
                         f"{adapter.img_size}: ground-truth masks would not line up with patches")
    truth = (adapter.pixel_to_patch(gt_pixels) if gt_pixels.any()
             else torch.zeros(len(all_ids), *adapter.grid, dtype=torch.bool))
    part_ = world.shard(len(all_ids))  # everything below is this rank's share of the images
    images = _to_device(adapter.prepare(pixels[part_]), device)
    labels, truth, ids = labels[part_].to(device), truth[part_], all_ids[part_]
    if not ids:
        raise ValueError(f"{world.size} ranks for {len(all_ids)} images of {dataset}: "
                         "start fewer processes or evaluate more images")
    budget = parse_bytes(cfg.memory_budget) if cfg.memory_budget else None
    chunk = meta["chunk_size"] = choose_chunk(adapter, images, budget, cfg.chunk_size)
    with autocast(device, cfg.autocast):
        logits_clean = clean_logits(adapter, images, chunk)
    pred = logits_clean.argmax(1)
    correct, seen = world.all_sum([(pred == labels).sum().item(), len(ids)])
    meta["eval_accuracy"] = round(correct / seen, 4)
    # each method and operator takes what it needs from the run through its own hook
    run = RunContext(cfg, dataset, adapter, meta, files, progress, world.local_rank0_first,
                     timing_only=timing_only, sample_ids=all_ids, ids=ids, images=images)
    with part.stage(dataset, "components (explainer training, dataset statistics)"):
        operators = {name: given.operators.get(name) or _create_operator(name, run)
                     for name in cfg.operators}
        method_options = {m: _method_options(m, run, operators)
                          for m in cfg.methods if m not in given.methods}
    meta["operators"] = {name: op.config() for name, op in operators.items()}
    with part.stage(dataset, "references (clean and all-removed passes)"), autocast(device, cfg.autocast):
        references = {name: prepare_reference(adapter, op, images, torch.tensor(ids), chunk, logits_clean)
                      for name, op in operators.items()}
    data_key = {"model": meta["key"], "weights": guard.digest, "dataset": dataset,
                "source": source, "sample_ids": stable_hash(ids, 24),
                "target": cfg.target, "precision": [device.type, cfg.autocast], "version": __version__,
                "code": source_digest(*CORE_SOURCES)}
    target = pred if cfg.target == "prediction" else labels
    gallery = _gallery_start(cfg, dataset, adapter, pixels[part_], labels, pred, truth, ids)
    instances = {m: obj if isinstance(obj, Method) else obj(adapter) for m, obj in given.methods.items()}
    return Job(run, guard, images, target, truth, ids, all_ids, chunk, method_options, operators,
               references, data_key, gallery, instances)


class Variant(NamedTuple):
    """One instance of a method in a run: the operator it is trained for and its training
    seed (None: not trained for one / not trained from a seed)."""

    operator: str | None
    seed: int | None


def _variants(name: str, run: RunContext, operators: dict[str, Any]) -> list[Variant]:
    cls = METHODS.get(name)
    ops = list(operators) if getattr(cls, "trained_for_operator", False) else [None]
    seeds = ([run.seed + i for i in range(run.cfg.train_seeds)] if getattr(cls, "trained", False)
             else [None])
    return [Variant(op, seed) for op in ops for seed in seeds]


def _method_options(name: str, run: RunContext, operators: dict[str, Any]) -> dict[str, Any]:
    """A method's options from its hook; per variant (operator, seed) for a method trained
    for each operator or from a seed."""
    cls, user = METHODS.get(name), run.cfg.method_options.get(name, {})
    variants = _variants(name, run, operators)
    if variants == [Variant(None, None)]:
        return options_from_run(cls, run, user)
    return {v: options_from_run(cls, run.for_operator(v.operator, operators.get(v.operator), v.seed), user)
            for v in variants}


def _execute(job: Job, name: str, store: ChunkStore, part: Part) -> bool:
    """One method on one dataset, isolated: its rows go into ``part``, or its failure does.

    Returns:
        Whether it was scored.
    """
    try:
        rows, frames, timing, maps = _score_method(job, name, store, part)
    except (MissingChunkError, KeyboardInterrupt, WeightsLostError):
        raise
    except OSError as e:
        if e.errno in DISK_FULL:  # not the method's fault: the whole run stops, one line
            raise
        return _failed(job, name, part, e)
    except Exception as e:  # one method's failure must not cost the others' results
        return _failed(job, name, part, e)
    part.scores += rows
    part.curves += frames
    if job.gallery:
        job.gallery["maps"][name] = maps[:len(job.gallery["ids"])].cpu()
    part.timing += timing
    return True


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _failed(job: Job, name: str, part: Part, e: Exception) -> bool:
    """Records one method's failure (a row in failures.csv and a warning)."""
    reason = f"{type(e).__name__}: {e}".splitlines()[0]
    part.failures.append({"dataset": job.run.dataset, "method": name, "error": reason})
    part.warn(f"patchbench: method {name!r} failed on {job.run.dataset}: {reason}")
    return False


def _check(job: Job, scored: list[str], world: World, store: ChunkStore, part: Part) -> None:
    """The checks of one dataset: model randomisation (on rank 0's first images) and the
    ground-truth mask against the random control (where the dataset has ground truth)."""
    dataset, n_sanity = job.run.dataset, min(job.cfg.sanity_images, len(job.ids))
    skipped = {m: _sanity_skip(job, m) for m in scored if m not in job.instances}
    skipped = {m: why for m, why in skipped.items() if why}
    checkable = [m for m in scored if m not in skipped]
    if world.rank == 0 and n_sanity >= 2 and scored:
        try:
            with part.stage(dataset, "sanity check"):
                part.sanity += _sanity_rows(job, store, part, checkable, n_sanity, skipped)
        except ModelChangedError as e:
            part.warn(f"patchbench: sanity check on {dataset} skipped: {e}")
    if job.truth.any() and chance_control(job.cfg.methods, job.instances) in scored:
        with part.stage(dataset, "metric check"):
            part.checks += _ground_truth_rows(job, store, part)
    if job.gallery:
        part.galleries.append(job.gallery)


def _collect(parts: list[dict[str, Any]], cfg: BenchConfig, sample_ids: dict[str, list[int]],
             given: Given) -> dict[str, Any]:
    """Every process's part merged into one process's tables, with statistics and checks."""
    scores_df, curves_df, timing_df, failures_df = _merge(parts, cfg, sample_ids)
    control = chance_control(cfg.methods, given.methods)
    summary = summarise(scores_df, seed=cfg.seed, control=control) if len(scores_df) else pd.DataFrame()
    seeds_df = pd.DataFrame([r for p in parts for r in p["seed_scores"]])
    if len(seeds_df) and len(summary):
        summary = with_seed_ranges(summary, seeds_df)
    truth_df = pd.DataFrame([r for p in parts for r in p["checks"]], columns=SCORE_COLUMNS).dropna()
    check_df = ground_truth_check(truth_df, scores_df, control)
    sanity_df = pd.DataFrame([r for p in parts for r in p["sanity"]])
    agreement_df = operator_agreement(summary) if len(summary) else pd.DataFrame()
    extra = [*normalised_tables(summary, cfg.scores)] if len(summary) else []
    if len(agreement_df):
        extra.append(agreement_table(agreement_df))
    if len(check_df):
        extra.append(ground_truth_table(check_df))
    if len(sanity_df):
        extra += sanity_table(sanity_df)
    transfer_df = pd.DataFrame([r for p in parts for r in p["transfer"]])
    if len(transfer_df) and len(scores_df):
        extra += transfer_table(scores_df, transfer_df)
    flagged = check_df[check_df.verdict == "flag"]
    stages = _stages(parts)
    return {"markdown": render_markdown(summary, timing_df, failures_df, extra, flagged, cfg.scores),
            "scores": scores_df, "curves": curves_df, "timing": timing_df, "summary": summary,
            "leaderboard": wide_leaderboard(summary) if len(summary) else pd.DataFrame(),
            "failures": failures_df.to_dict("records"), "failures_df": failures_df,
            "metric_check": check_df, "flagged": flagged, "sanity": sanity_df,
            "rank_stability": agreement_df, "extra": extra, "stages": stages, "transfer": transfer_df,
            "seed_scores": seeds_df,
            "galleries": _merge_galleries(parts, cfg)}


def _stages(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seconds per (dataset, stage): summed within a process, the slowest process's."""
    rows = [{**s, "rank": r} for r, p in enumerate(parts) for s in p["stages"]]
    if not rows:
        return []
    df = pd.DataFrame(rows).groupby(["dataset", "stage", "rank"], sort=False, as_index=False).seconds.sum()
    df = df.groupby(["dataset", "stage"], sort=False, as_index=False).seconds.max()
    return [{**r, "seconds": round(r["seconds"], 2)} for r in df.to_dict("records")]


def _run_record(cfg: BenchConfig, models: dict[str, Any], sample_ids: dict[str, list[int]],
                parts: list[dict[str, Any]], out: dict[str, Any], plugin_problems: list[str],
                store: ChunkStore, world: World, device: torch.device, started: float) -> dict[str, Any]:
    """``run.json``: the config, seeds, models, samples, timings, problems and provenance."""
    return {
        "config": asdict(cfg),
        "seeds": {"run": cfg.seed, "model_training": cfg.seed, "sample_selection": cfg.seed,
                  "noise_operator": cfg.seed, "random_method": cfg.seed},
        "models": models,
        "sample_ids": sample_ids,
        "timing": {"total_seconds": round(time.perf_counter() - started, 1),
                   "stages": out["stages"],
                   "attribution_ms_per_image": out["timing"].to_dict("records")},
        "patchbench_version": __version__,
        "failures": out["failures"],
        "warnings": list(dict.fromkeys(w for p in parts for w in p["warnings"])),
        "plugin_problems": plugin_problems,
        "chunks": {"root": str(store.root), "reused": sum(p["chunks"][0] for p in parts),
                   "computed": sum(p["chunks"][1] for p in parts)},
        "world": {"ranks": world.size, "device": str(device)},
        **provenance(),
    }


def _write(cfg: BenchConfig, out: dict[str, Any], run: dict[str, Any], files: dict[str, Path]) -> Path:
    """The run folder, written whole or not at all; ``run.json`` last, with the writing's time."""
    t0 = time.perf_counter()
    curves_png = plot_curves(out["curves"]) if len(out["curves"]) else b""
    extra = [*out["extra"], stages_table(out["stages"])] if out["stages"] else out["extra"]
    sections = report_sections(cfg, out["summary"], out["timing"], out["failures_df"], out["flagged"],
                               extra, out["metric_check"], out["sanity"], curves_png, out["galleries"])

    def csv(df: pd.DataFrame, **kwargs: Any) -> Callable[[Path], None]:
        return lambda p: df.to_csv(p, index=False, float_format="%.6g", **kwargs)

    def finish(p: Path) -> None:
        run["timing"]["stages"] = [*run["timing"]["stages"], {
            "dataset": "-", "stage": "writing", "seconds": round(time.perf_counter() - t0, 2)}]
        write_json(p, run)

    optional = {"curves.png": (curves_png, lambda p: p.write_bytes(curves_png)),
                "metric_check.csv": (len(out["metric_check"]), csv(out["metric_check"])),
                "sanity.csv": (len(out["sanity"]), csv(out["sanity"])),
                "rank_stability.csv": (len(out["rank_stability"]), csv(out["rank_stability"])),
                "transfer.csv": (len(out["transfer"]), csv(out["transfer"])),
                "seed_scores.csv": (len(out["seed_scores"]), csv(out["seed_scores"])),
                "failures.csv": (out["failures"], lambda p: out["failures_df"].to_csv(p, index=False))}
    run_dir = Path(cfg.results_dir) / cfg.run
    write_run(run_dir, {
        "scores.csv": csv(out["scores"]),
        # level 1: 30% faster than the default 9 on the default run's 2.1M rows, 26% larger
        "curves.csv.gz": csv(out["curves"], compression={"method": "gzip", "compresslevel": 1}),
        "leaderboard.csv": csv(out["leaderboard"]),
        "leaderboard.md": lambda p: p.write_text(f"# patchbench leaderboard: {cfg.run}\n\n{out['markdown']}"),
        "report.html": lambda p: write_report(p, f"patchbench report: {cfg.run}", sections, run),
        **{name: write for name, (present, write) in optional.items() if present},
        **{name: (lambda p, src=src: shutil.copyfile(src, p)) for name, src in files.items()
           if src.exists()},
        "run.json": finish,
    })
    return run_dir


def _score_method(job: Job, name: str, store: ChunkStore, part: Part
                  ) -> tuple[list[dict[str, Any]], list[pd.DataFrame], list[dict[str, Any]], Tensor]:
    """One method on one dataset: maps, then curves under every operator, each a stored chunk.

    A method trained for each operator has one instance per operator: its rows under an
    operator are those of the instance trained for it; its other pairs go to ``part.transfer``
    and its localisation rows are named ``method[operator]`` (one per instance). A method
    trained from a seed has one instance per seed: its rows are the mean over the seeds per
    image, and each seed's rows go to ``part.seed_scores`` (for the range over seeds).

    Returns:
        Score rows, curve frames, timing rows (per operator trained for: attribution ms per
        image, the seconds its setup took over all seeds, e.g. training, and the number of
        seeds) and the maps ``[B, Hp, Wp]`` (of the first instance).
    """
    rows, frames, timing, shown = [], [], [], None
    variants = job.variants(name)
    trained_for = list(dict.fromkeys(v.operator for v in variants))
    for op in trained_for:
        label = name if len(trained_for) == 1 else f"{name}[{op}]"
        seeds = [v for v in variants if v.operator == op]
        done = [_score_variant(job, name, label, v, store, part) for v in seeds]
        if len(done) > 1:
            part.seed_scores += [{**r, "train_seed": v.seed} for v, d in zip(seeds, done) for r in d.rows]
        rows += _mean_rows([d.rows for d in done])
        frames += [_mean_frame([d.frames[i] for d in done]) for i in range(len(done[0].frames))]
        part.transfer += _mean_rows([d.transfer for d in done])
        setups = [d.setup for d in done if d.setup is not None]
        timing.append({"dataset": job.run.dataset, "method": name, "operator": op or "",
                       "ms_per_image": sum(d.ms_per_image for d in done) / len(done),
                       "images": len(job.ids), "setup_seconds": sum(setups) if setups else None,
                       "seeds": len(done)})
        shown = done[0].maps if shown is None else shown
    return rows, frames, timing, shown


@dataclass
class Scored:
    """One instance of a method scored: its rows (localisation, and curves under the
    operators it is for), transfer rows (under the others), curve frames, cost and maps."""

    rows: list[dict[str, Any]]
    transfer: list[dict[str, Any]]
    frames: list[pd.DataFrame]
    ms_per_image: float
    setup: float | None
    maps: Tensor


def _score_variant(job: Job, name: str, label: str, variant: Variant, store: ChunkStore,
                   part: Part) -> Scored:
    maps, maps_key, secs, setup = _maps(job, name, variant, store, part)
    rows, transfer, frames = [], [], []
    if job.truth.any():  # localisation scores only where the dataset has ground truth
        rows += _rows(job.base, label, "-", localisation_scores(maps.cpu(), job.truth), job.ids)
    for op_name in job.operators:
        more, frame = _curve_rows(job, store, part, maps_key, maps, name, op_name)
        if variant.operator in (None, op_name):
            rows, frames = rows + more, frames + frame
        else:  # trained for another operator: a transfer pair, not a leaderboard row
            transfer += [{**r, "trained_for": variant.operator} for r in more]
    return Scored(rows, transfer, frames, 1000 * secs / len(job.ids), setup, maps)


def _mean_rows(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows (the same keys in the same order for every seed) with each value the mean over
    the seeds (NaN where every seed's is NaN)."""
    if len(per_seed) == 1:
        return per_seed[0]
    return [{**r, "value": float(pd.Series([rows[i]["value"] for rows in per_seed]).mean())}
            for i, r in enumerate(per_seed[0])]


def _mean_frame(per_seed: list[pd.DataFrame]) -> pd.DataFrame:
    """A curve frame with each value the mean over the seeds' frames (the same rows)."""
    if len(per_seed) == 1:
        return per_seed[0]
    out = per_seed[0].copy()
    out["value"] = np.mean([f["value"].to_numpy() for f in per_seed], axis=0)
    return out


def _maps(job: Job, name: str, variant: Variant, store: ChunkStore, part: Part
          ) -> tuple[Tensor, dict[str, Any], float, float | None]:
    """The method's maps of the job's images (a stored chunk), their key, their seconds and
    the method's setup seconds (None without a setup)."""
    cfg, images, target, dataset = job.cfg, job.images, job.target, job.run.dataset
    method = job.instances.get(name) or create_method(name, job.run.adapter, **job.options(name, variant))
    job.guard.check(f"method {name!r}")
    maps_key = {"kind": "maps", **job.data_key, "method": method.config(),
                "method_code": file_digest(inspect.getsourcefile(type(method)))}

    def attribute() -> dict[str, Tensor]:
        t0 = time.perf_counter()
        with autocast(images.device, cfg.autocast):
            maps = torch.cat([
                method.attribute(x, t) for x, t in tqdm(
                    list(zip(images.split(cfg.batch_size), target.split(cfg.batch_size))),
                    desc=f"{dataset}: {name}", disable=not job.run.progress, leave=False)])
        sync(images.device)
        job.guard.check(f"method {name!r}")  # raising here stores nothing
        return {"maps": maps, "seconds": torch.tensor(time.perf_counter() - t0, dtype=torch.float64)}

    seeded = job.cfg.train_seeds > 1 and variant.seed is not None
    detail = ", ".join([*([f"for {variant.operator}"] if variant.operator else []),
                        *([f"seed {variant.seed}"] if seeded else [])])
    with part.stage(dataset, f"attribution: {name}" + (f" ({detail})" if detail else "")):
        got = store.get(maps_key, attribute)
    return got["maps"].to(images.device), maps_key, float(got["seconds"]), method.setup_seconds()


def _curve_rows(job: Job, store: ChunkStore, part: Part, maps_key: dict[str, Any], maps: Tensor,
                name: str, op_name: str) -> tuple[list[dict[str, Any]], list[pd.DataFrame]]:
    """Faithfulness scores and curves of ``maps`` under operator ``op_name`` (a stored chunk)."""
    cfg, images, op = job.cfg, job.images, job.operators[op_name]
    curves_key = {**maps_key, "kind": "curves", "operator": op.config(), "steps": cfg.steps,
                  "harness_code": source_digest(*HARNESS_SOURCES),
                  "operator_code": file_digest(inspect.getsourcefile(type(op)))}

    def score() -> dict[str, Tensor]:
        with autocast(images.device, cfg.autocast):
            c = faithfulness_curves(job.run.adapter, op, images, job.target, maps,
                                    job.references[op_name], cfg.steps, job.chunk,
                                    progress=job.run.progress)
        return {"x": c.x, **{f"{q}_{k}": v for q in QUANTITIES for k, v in getattr(c, q).items()}}

    with part.stage(job.run.dataset, f"curves: {op_name}"):
        p = store.get(curves_key, score)
    c = Curves(p["x"], **{q: {k: p[f"{q}_{k}"] for k in CURVES} for q in QUANTITIES})
    frame = _curve_frame(job.base, name, op_name, c, job.ids)
    return _rows(job.base, name, op_name, c.scores(), job.ids), [frame]


def _sanity_rows(job: Job, store: ChunkStore, part: Part, names: list[str], n: int,
                 skipped: dict[str, str]) -> list[dict[str, Any]]:
    """Cascading model randomisation on the first ``n`` images: one stored chunk per dataset;
    the ``skipped`` methods (method -> why) get rows saying "not applicable".

    Each stage re-initialises one more part of the model, from the head down; every method's
    maps on that copy are compared with its maps on the trained model (Spearman per image).
    Both are computed here under one private seed, so a method's own randomness is the same
    on the trained and the randomised model (the run's maps were drawn with another state).
    """
    cfg, adapter = job.cfg, job.run.adapter
    images, target, dataset = job.images[:n], job.target[:n], job.run.dataset
    stages = randomisation_stages(adapter)
    retrained = {m: _retrained(job, m) for m in names}
    key = {"kind": "sanity", **job.data_key, "images": n, "seed": cfg.seed, "stages": stages,
           "sanity_code": source_digest("bench/sanity.py"),
           "methods": {m: {"options": job.options(m, job.variants(m)[0]), "retrained": retrained[m],
                           "code": file_digest(inspect.getsourcefile(
                               type(job.instances[m]) if m in job.instances else METHODS.get(m)))}
                       for m in names}}
    if any(retrained.values()):
        key["diffmask_config"] = cfg.diffmask_config  # what a retrained method trains with

    def compute() -> dict[str, Tensor]:
        factories = {m: _sanity_factory(job, m) for m in names}
        with autocast(images.device, cfg.autocast):
            rho, errors = randomised_correlations(
                adapter, factories, images, target, cfg.seed, job.run.progress, cfg.batch_size,
                desc=f"{dataset}: sanity check")
        job.guard.check("a method in the sanity check")
        for name, why in errors.items():  # the verdict says "error"; the reason is told once
            part.warn(f"patchbench: sanity check of {name!r} on {dataset} failed: {why}")
        return {"spearman": rho}

    base = {**job.base, "images": n}
    none = torch.full((len(skipped), len(stages), n), float("nan"))
    rows = sanity_rows(none, list(skipped), stages, base, cfg.seed, not_applicable=skipped)
    if names:
        rows = sanity_rows(store.get(key, compute)["spearman"], names, stages, base, cfg.seed) + rows
    return [{**r, "retrained": retrained.get(r["method"], "")} for r in rows]


def _sanity_skip(job: Job, name: str) -> str:
    """Why the sanity check does not apply to method ``name`` ("" when it does)."""
    cls = METHODS.get(name)
    if not getattr(cls, "sanity_checkable", True):
        return cls.sanity_note
    if getattr(cls, "trained", False) and job.cfg.sanity_train_steps == 0:
        return ("trained for the original model, and retraining it for each randomised copy is "
                "switched off (sanity_train_steps = 0)")
    return ""


def _retrained(job: Job, name: str) -> str:
    """How a trained method is retrained for the check ("" for the others)."""
    if name in job.instances or not getattr(METHODS.get(name), "trained", False):
        return ""
    variant = job.variants(name)[0]
    against = f", against {variant.operator}" if variant.operator else ""
    return f"{job.cfg.sanity_train_steps} steps{against}"


def _sanity_factory(job: Job, name: str) -> Callable[[Any], Method]:
    """Makes method ``name`` for another model (the check's trained and randomised models):
    with its own options, and a trained method retrained for that model (its first variant:
    the first operator it is trained for, the first seed)."""
    if name in job.instances:
        method = job.instances[name]
        options = {k: v for k, v in method.config().items() if k != "name"}
        return lambda adapter: type(method)(adapter, **options)
    variant = job.variants(name)[0]
    options = job.options(name, variant)
    cls = METHODS.get(name)
    if not getattr(cls, "trained", False):
        return functools.partial(create_method, name, **options)
    run = job.run.for_operator(variant.operator, job.operators.get(variant.operator), variant.seed)
    return lambda adapter: create_method(name, adapter, **cls.options_for_model(run, dict(options), adapter))


GROUND_TRUTH = "ground-truth mask"


def _ground_truth_rows(job: Job, store: ChunkStore, part: Part) -> list[dict[str, Any]]:
    """Faithfulness scores of the ground-truth mask used as a map: the metric check.

    Object patches rank first (ties by patch index), so a metric that measures faithfulness
    on this data should score the mask better than the ``random`` control.
    """
    maps = job.truth.to(job.images.device).float()
    key = {"kind": "maps", **job.data_key, "method": {"name": GROUND_TRUTH}}
    return [r for op in job.operators for r in _curve_rows(job, store, part, key, maps, GROUND_TRUTH, op)[0]]


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
    keys = ["dataset", "method", "operator"]
    timing = ok(pd.DataFrame([t for p in parts for t in p["timing"]],
                             columns=[*keys, "ms_per_image", "images", "setup_seconds", "seeds"]))
    timing["ms"] = timing["ms_per_image"] * timing["images"]
    timing["operator"] = timing["operator"].astype(object).fillna("")  # "": one instance for all
    timing_df = timing.groupby(keys, sort=False, as_index=False, dropna=False).agg(
        ms=("ms", "sum"), images=("images", "sum"), setup_seconds=("setup_seconds", "max"),
        seeds=("seeds", "max"))
    timing_df["ms_per_image"] = timing_df["ms"] / timing_df["images"]
    return (scores_df, curves_df, timing_df[[*keys, "ms_per_image", "setup_seconds", "images", "seeds"]],
            failures_df)


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


def _data_source(cfg: BenchConfig, dataset: str) -> dict[str, Any] | None:
    """Where a dataset on disk was read from (part of the chunk keys); None for generated data."""
    if not issubclass(DATASETS.get(dataset), FileDataset):
        return None
    root = str(Path(cfg.data_root).resolve()) if cfg.data_root else None
    return {"data_root": root, **cfg.dataset_options.get(dataset, {})}


def chance_control(names: tuple[str, ...], given: dict[str, Any]) -> str | None:
    """The first of ``names`` whose method declares ``chance_control`` (``random``), or None."""
    for name in names:
        obj = given.get(name) or (METHODS.get(name) if name in METHODS else None)
        if getattr(obj if isinstance(obj, type) else type(obj), "chance_control", False):
            return name
    return None


def _load_model(cfg: BenchConfig, dataset: str, progress: bool) -> tuple[Any, dict[str, Any]]:
    """An embedded model trained for ``dataset``, any timm model by name, or ``hf:<id>``."""
    if cfg.model in MODELS:
        return load_model(cfg.model, dataset, TrainConfig(seed=cfg.seed), progress=progress)
    return create_model(cfg.model, cfg.pretrained, cfg.checkpoint)


def _load_plugins(cfg: BenchConfig) -> list[str]:
    """Installed plugins and ``cfg.plugins``; problems are reported and the run goes on."""
    plugins.load_all(cfg.plugins)
    return plugins.problems_of(cfg.plugins)


def _check_token_needs(cfg: BenchConfig, adapter: Any, warn: Callable[[str], None] | None = None) -> None:
    """Refuses, before any work, methods and operators a non-ViT model cannot serve; with
    ``warn``, leaves them out of ``cfg`` and says so instead."""
    if adapter.is_vit:
        return
    methods = [m for m in cfg.methods if m in METHODS and METHODS.get(m).needs_tokens]
    operators = [o for o in cfg.operators if o in OPERATORS and OPERATORS.get(o).needs_tokens]
    if (methods or operators) and warn is not None:
        warn(f"patchbench: {cfg.model} is not a vision transformer; left out: "
             f"{', '.join(methods + operators)}")
        cfg.methods = tuple(m for m in cfg.methods if m not in methods)
        cfg.operators = tuple(o for o in cfg.operators if o not in operators)
    elif methods or operators:
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
        for quantity in QUANTITIES:
            values = getattr(c, quantity)[curve]
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
