"""Command line: ``patchbench bench | train | list`` (also ``python -m patchbench``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields

from patchbench.registry import UnknownNameError


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _parser() -> argparse.ArgumentParser:
    from patchbench.bench.config import BenchConfig

    d = BenchConfig()
    p = argparse.ArgumentParser(prog="patchbench", description=(
        "Which attribution method is faithful to my ViT? Scores patch attributions with "
        "deletion / insertion / LeRF curves of p(target) and KL(p_clean || p)."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("bench", help="run a benchmark and write results/<run>/",
                       description="Train (or reuse) the model, attribute, score, and write "
                                   "scores.csv, curves, leaderboard.md/.csv, curves.png, run.json.")
    b.add_argument("--run", default=d.run, help="run name: results go to RESULTS_DIR/RUN "
                   "(default: %(default)s)")
    b.add_argument("--model", default=d.model,
                   help="embedded model (pb-vit-tiny, trained per dataset) or any timm model name "
                        "(default: %(default)s)")
    b.add_argument("--pretrained", action="store_true", help="timm model: load timm's pretrained weights")
    b.add_argument("--checkpoint", default=None, help="timm model: local .safetensors/.pth weights")
    b.add_argument("--data-root", default=None,
                   help="folder of a dataset read from disk (cifar10, imagefolder)")
    b.add_argument("--datasets", type=_csv, default=d.datasets,
                   help="comma-separated dataset names (default: %(default)s)")
    b.add_argument("--methods", type=_csv, default=d.methods,
                   help="comma-separated method names or wildcards (default: %(default)s)")
    b.add_argument("--operators", type=_csv, default=d.operators,
                   help="comma-separated removal operators (default: %(default)s)")
    b.add_argument("--n-images", type=int, default=d.n_images,
                   help="images per dataset, stratified over classes (default: %(default)s)")
    b.add_argument("--steps", type=int, default=d.steps,
                   help="steps per curve, 0 = one per patch (default: %(default)s)")
    b.add_argument("--seed", type=int, default=d.seed, help="seed for everything (default: 0)")
    b.add_argument("--target", choices=["prediction", "label"], default=d.target,
                   help="class whose probability is tracked (default: %(default)s)")
    b.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per attribution call (default: %(default)s)")
    b.add_argument("--chunk-size", type=int, default=d.chunk_size,
                   help="(image, step) rows per forward pass (default: %(default)s)")
    b.add_argument("--results-dir", default=d.results_dir, help="(default: %(default)s)")
    b.add_argument("--quiet", action="store_true", help="no progress bars or table")

    t = sub.add_parser("train", help="train (or load from cache) an embedded model on a dataset",
                       description="Train a small ViT on a registered dataset; the checkpoint is "
                                   "cached under a key of architecture, dataset, seed and config.")
    t.add_argument("--dataset", required=True, help="dataset name (see `patchbench list datasets`)")
    t.add_argument("--model", default=d.model, help="architecture (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    t.add_argument("--epochs", type=int, default=1, help="(default: %(default)s)")
    t.add_argument("--train-size", type=int, default=20_000, help="(default: %(default)s)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    dm = sub.add_parser("train-diffmask", help="train (or load from cache) a Vision DiffMask explainer",
                        description="Train DiffMask gates and placeholder for a model on a dataset's "
                                    "train split; log KL, L0 and multipliers per step to "
                                    "RESULTS_DIR/RUN/diffmask_train_<dataset>.csv.")
    dm.add_argument("--model", default=d.model, help="architecture (default: %(default)s)")
    dm.add_argument("--dataset", required=True, help="dataset name")
    dm.add_argument("--steps", type=int, default=None, help="optimisation steps (default: config)")
    dm.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    dm.add_argument("--run", default="diffmask", help="run folder for the log (default: %(default)s)")
    dm.add_argument("--results-dir", default=d.results_dir, help="(default: %(default)s)")
    dm.add_argument("--quiet", action="store_true", help="no progress bar")

    ls = sub.add_parser("list", help="list registered methods, datasets, operators or models",
                        description="List registered names, optionally filtered by a wildcard.")
    ls.add_argument("kind", choices=["methods", "datasets", "operators", "models"])
    ls.add_argument("pattern", nargs="?", default="*", help="wildcard, e.g. '*grad*'")
    return p


def _expand_methods(patterns: tuple[str, ...]) -> tuple[str, ...]:
    from patchbench.methods import METHODS

    out: list[str] = []
    for pat in patterns:
        names = METHODS.list(pat) if any(ch in pat for ch in "*?[") else [pat]
        if not names:
            raise UnknownNameError(f"no method matches {pat!r}. Valid methods: "
                                   f"{', '.join(METHODS.list())}.")
        out += [n for n in names if n not in out]
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            return _list(args)
        if args.command == "train":
            return _train(args)
        if args.command == "train-diffmask":
            return _train_diffmask(args)
        return _bench(args)
    except (UnknownNameError, ValueError, FileNotFoundError) as e:  # NotAViTError is a ValueError
        print(f"patchbench: error: {e}", file=sys.stderr)
        return 2


def _list(args: argparse.Namespace) -> int:
    from patchbench.datasets import DATASETS
    from patchbench.methods import METHODS
    from patchbench.models import MODELS, OPERATORS

    registry = {"methods": METHODS, "datasets": DATASETS, "operators": OPERATORS,
                "models": MODELS}[args.kind]
    for name in registry.list(args.pattern):
        doc = (registry.get(name).__doc__ or "").strip().splitlines()
        print(f"{name:24s} {doc[0] if doc else ''}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from patchbench.models.zoo import TrainConfig, checkpoint_path, load_model

    cfg = TrainConfig(seed=args.seed, epochs=args.epochs, train_size=args.train_size)
    adapter, meta = load_model(args.model, args.dataset, cfg, progress=not args.quiet)
    print(json.dumps({**meta, "checkpoint": str(checkpoint_path(adapter.key))}, indent=2))
    return 0


def _train_diffmask(args: argparse.Namespace) -> int:
    import dataclasses
    import shutil
    from pathlib import Path

    from patchbench.methods.diffmask import diffmask_meta
    from patchbench.methods.diffmask_train import DiffMaskConfig, train_or_load
    from patchbench.models.zoo import TrainConfig, load_model
    from patchbench.utils import atomic_path

    adapter, _ = load_model(args.model, args.dataset, TrainConfig(seed=args.seed), progress=not args.quiet)
    cfg = DiffMaskConfig(seed=args.seed)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    path = train_or_load(adapter, args.dataset, cfg, progress=not args.quiet)
    out = Path(args.results_dir) / args.run / f"diffmask_train_{args.dataset}.csv"
    with atomic_path(out) as tmp:
        shutil.copyfile(path.with_suffix(".csv"), tmp)
    print(json.dumps({**diffmask_meta(path), "checkpoint": str(path), "log": str(out)}, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from patchbench.bench.config import BenchConfig
    from patchbench.bench.runner import run_benchmark

    names = {f.name for f in fields(BenchConfig)}
    cfg = BenchConfig(**{k: v for k, v in vars(args).items() if k in names})
    cfg.methods = _expand_methods(cfg.methods)
    cfg.steps = cfg.steps or None
    start = time.perf_counter()
    out = run_benchmark(cfg, progress=not args.quiet)
    if not args.quiet:
        print()
        print(out["markdown"])
        print(f"wrote {out['run_dir']}/ in {time.perf_counter() - start:.0f} s")
    return 0
