"""Command line: ``patchbench bench | train | list`` (also ``python -m patchbench``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from typing import Any

from patchbench.errors import MissingChunkError, WeightsLostError
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
                                   "scores.csv, curves, leaderboard.md/.csv, curves.png, run.json. "
                                   "Settings come from the defaults, then --config, then the "
                                   "options given here.")
    b.add_argument("--config", default=None,
                   help="TOML run config: a path, or the name of a shipped config (default, paper-cifar10, "
                        "paper-imagenet, ours)")
    add_config_options(b)
    b.add_argument("--quiet", action="store_true", help="no progress bars or table")

    t = sub.add_parser("train", help="train an embedded model, or fine-tune a timm model on data on disk",
                       description="Embedded models (pb-vit-tiny) train on a generated dataset and are "
                                   "cached by key. Any timm model fine-tunes on cifar10/imagefolder "
                                   "with checkpoints in --out; the same command again resumes.")
    t.add_argument("--dataset", required=True, help="dataset name (see `patchbench list datasets`)")
    t.add_argument("--model", default=d.model, help="pb-vit-tiny or a timm model (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    t.add_argument("--epochs", type=int, default=None, help="(default: 1 embedded, 3 fine-tuning)")
    t.add_argument("--train-size", type=int, default=20_000, help="embedded: generated training images")
    t.add_argument("--pretrained", action="store_true", help="fine-tuning: start from timm's weights")
    t.add_argument("--checkpoint", default=None, help="fine-tuning: start from local weights")
    t.add_argument("--data-root", default=None, help="fine-tuning: dataset folder")
    t.add_argument("--eval-data-root", default=None,
                   help="fine-tuning: evaluation folder (imagefolder; default: test split of --data-root)")
    t.add_argument("--out", default=None,
                   help="fine-tuning: output folder (default: checkpoints/MODEL_DATASET)")
    t.add_argument("--batch-size", type=int, default=64, help="fine-tuning (default: %(default)s)")
    t.add_argument("--lr", type=float, default=1e-4, help="fine-tuning peak lr (default: %(default)s)")
    t.add_argument("--limit", type=int, default=None, help="fine-tuning: training images (stratified)")
    t.add_argument("--save-every", type=int, default=200, help="steps between checkpoints (default: 200)")
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resumable)")
    t.add_argument("--no-resume", action="store_true", help="start over even if OUT/last.pt exists")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    t.add_argument("--autocast", choices=["bf16", "fp16"], default=None, help="mixed precision on GPU")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    dm = sub.add_parser("train-diffmask", help="train (or load from cache) a Vision DiffMask explainer",
                        description="Train DiffMask gates and placeholder for a model on a dataset's "
                                    "train split; log KL, L0 and multipliers per step to "
                                    "RESULTS_DIR/RUN/diffmask_train_<dataset>_<operator>.csv.")
    dm.add_argument("--model", default=d.model, help="architecture (default: %(default)s)")
    dm.add_argument("--dataset", required=True, help="dataset name")
    dm.add_argument("--steps", type=int, default=None, help="optimisation steps (default: config)")
    dm.add_argument("--operator", default=None,
                    help="train against this removal operator's relaxation (as a run does for its "
                         "table); default: the learned placeholder, the paper's")
    dm.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    dm.add_argument("--run", default="diffmask", help="run folder for the log (default: %(default)s)")
    dm.add_argument("--results-dir", default=d.results_dir, help="(default: %(default)s)")
    dm.add_argument("--quiet", action="store_true", help="no progress bar")

    r = sub.add_parser("regress", help="run a small config and compare its scores with the reference",
                       description="Runs the config (recomputing everything) and fails, with a table, "
                                   "when a score moved beyond the reference's tolerance.")
    r.add_argument("--config", default="ci", help="config name or path (default: %(default)s)")
    r.add_argument("--update", action="store_true", help="accept this run's scores as the reference")
    r.add_argument("--reference-dir", default="results/reference", help="(default: %(default)s)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")

    from patchbench.bench.config import SpeedConfig

    sp = SpeedConfig()
    s = sub.add_parser("speed", help="measure the harness against the forward-pass bound, a naive loop "
                                     "and Quantus; write results/speed/speed.md",
                       description="Times the same deletion curve computed by patchbench, by the bare "
                                   "model's forward passes at their best batch size (the bound), by a "
                                   "naive loop and by Quantus, checking each curve against patchbench's; "
                                   "then every operator, every method's attribution, and peak memory.")
    s.add_argument("--model", default=sp.model, help="(default: %(default)s)")
    s.add_argument("--pretrained", action="store_true", help="load timm's weights (hub access)")
    s.add_argument("--dataset", default=sp.dataset, help="(default: %(default)s)")
    s.add_argument("--data-root", default=None, help="dataset folder, for datasets on disk")
    s.add_argument("--n-images", type=int, default=sp.n_images, help="(default: %(default)s)")
    s.add_argument("--steps", type=int, default=0,
                   help="steps per curve, 0 = one per patch, as Quantus steps (default: 0)")
    s.add_argument("--methods", type=_csv, default=sp.methods, help="methods to time (default: all six)")
    s.add_argument("--operators", type=_csv, default=sp.operators, help="(default: mean,blur,drop)")
    s.add_argument("--batch-size", type=int, default=sp.batch_size, help="images per attribution call")
    s.add_argument("--chunk-size", type=int, default=sp.chunk_size, help="most rows per forward pass")
    s.add_argument("--memory-budget", default=None, help="choose the rows per pass from this, e.g. 1GiB")
    s.add_argument("--slow-images", type=int, default=None,
                   help="images for the naive loop and Quantus (default: all; fewer for big models)")
    s.add_argument("--no-quantus", dest="quantus", action="store_false", help="skip Quantus")
    s.add_argument("--repeats", type=int, default=sp.repeats, help="timed repeats (median)")
    s.add_argument("--device", default=sp.device, help="auto, cpu, cuda or cuda:N")
    s.add_argument("--autocast", choices=["bf16", "fp16"], default=None, help="mixed precision on GPU")
    s.add_argument("--out", default=sp.out, help="(default: %(default)s)")
    s.add_argument("--quiet", action="store_true", help="no progress bars or table")

    ls = sub.add_parser("list", help="list registered methods, datasets, operators or models",
                        description="List registered names, optionally filtered by a wildcard.")
    ls.add_argument("kind", choices=["methods", "datasets", "operators", "models"])
    ls.add_argument("pattern", nargs="?", default="*", help="wildcard, e.g. '*grad*'")
    ls.add_argument("--plugin", dest="plugins", action="append", default=[],
                    help="also load this method plugin (path/to/file.py or module:object)")
    return p


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per command-line setting of :class:`BenchConfig`, derived from its
    declarations (type, default, help, flags, choices). Options default to SUPPRESS, so only
    those given override the config file."""
    import typing

    from patchbench.bench.config import BenchConfig

    hints = typing.get_type_hints(BenchConfig)
    for f in fields(BenchConfig):
        meta, kind = f.metadata, hints[f.name]
        if not meta.get("cli", True):
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if meta["repeat"]:
            kwargs.update(action="append", metavar="VALUE")
        elif kind is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(kind) is tuple:
            kwargs["type"] = _csv
        elif kind is int or int in typing.get_args(kind):
            kwargs["type"] = int
        if meta["choices"]:
            kwargs["choices"] = list(meta["choices"])
        default = f.default
        unset = default is None or default is False or default == ()
        shown = ",".join(default) if isinstance(default, tuple) else default
        suffix = "" if unset or "(default" in meta["help"] else f" (default: {shown})"
        flags = meta["flags"] or (f"--{f.name.replace('_', '-')}",)
        parser.add_argument(*flags, help=meta["help"] + suffix, **kwargs)


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


# errors a person can act on: one line, exit 2 (a traceback would only hide the message)
USER_ERRORS = (UnknownNameError, ValueError, OSError, MissingChunkError, WeightsLostError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"list": _list, "train": _train, "train-diffmask": _train_diffmask,
                "regress": _regress, "speed": _speed, "bench": _bench}
    try:
        return commands[args.command](args)
    except USER_ERRORS as e:  # NotAViTError, CheckpointError, RunFolderError, ENOSPC too
        print(f"patchbench: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("patchbench: interrupted; stored results are kept, the same command resumes",
              file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    text = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}"
    return " ".join(text.split()) or type(e).__name__


def _list(args: argparse.Namespace) -> int:
    import fnmatch

    from patchbench import catalogue

    if not args.plugins and not catalogue.has_installed_plugins():  # the built-ins: no torch import
        found = catalogue.builtins()[args.kind]
        docs = {n: found[n] for n in sorted(found) if fnmatch.fnmatch(n, args.pattern)}
    else:
        from patchbench.datasets import DATASETS
        from patchbench.methods import METHODS, plugins
        from patchbench.models import MODELS, OPERATORS

        plugins.load_all(args.plugins)
        registry = {"methods": METHODS, "datasets": DATASETS, "operators": OPERATORS,
                    "models": MODELS}[args.kind]
        docs = {n: ((registry.get(n).__doc__ or "").strip().splitlines() or [""])[0]
                for n in registry.list(args.pattern)}
    for name, doc in docs.items():
        print(f"{name:24s} {doc}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from patchbench.models.zoo import MODELS, TrainConfig, checkpoint_path, load_model

    if args.model not in MODELS:
        return _finetune(args)
    cfg = TrainConfig(seed=args.seed, epochs=args.epochs or 1, train_size=args.train_size)
    adapter, meta = load_model(args.model, args.dataset, cfg, progress=not args.quiet)
    print(json.dumps({**meta, "checkpoint": str(checkpoint_path(adapter.key))}, indent=2))
    return 0


def _speed(args: argparse.Namespace) -> int:
    from patchbench.bench.config import SpeedConfig
    from patchbench.bench.speed import run_speed

    names = {f.name for f in fields(SpeedConfig)}
    cfg = SpeedConfig(**{k: v for k, v in vars(args).items() if k in names})
    cfg.steps = cfg.steps or None
    out = run_speed(cfg, progress=not args.quiet, pretrained=args.pretrained, data_root=args.data_root)
    if not args.quiet:
        print(out["markdown"])
    print(f"wrote {out['out']}/speed.md, speed.csv and speed.json")
    return 0


def _regress(args: argparse.Namespace) -> int:
    from patchbench.bench.regress import RegressionError, regress, render

    try:
        table = regress(args.config, args.reference_dir, update=args.update, progress=not args.quiet)
    except RegressionError as e:
        print(f"patchbench: regression: {e}", file=sys.stderr)
        return 1
    verb = "wrote reference for" if args.update else "no score moved beyond the tolerance in"
    print(f"{verb} {len(table)} scores of config {args.config!r}")
    if not args.update:
        checked = table[table.status != "unstable"]
        worst = checked.assign(margin=checked["diff"].abs() / checked["allowed"]).nlargest(3, "margin")
        print(render(worst.drop(columns="margin")))
    unstable = table[table.status == "unstable"]
    if len(unstable):
        beyond = unstable[unstable["diff"].abs() > unstable["allowed"]]
        print(f"not checked: {len(unstable)} scores measured to flip between CPUs (the reference's "
              f"'unstable' table says why); {len(beyond)} of them moved beyond their tolerance"
              + (f":\n{render(beyond)}" if len(beyond) else ""))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from patchbench.models.finetune import FinetuneConfig, finetune

    if args.data_root is None:
        raise ValueError(f"fine-tuning {args.model} needs --data-root (the {args.dataset} folder)")
    cfg = FinetuneConfig(epochs=args.epochs or 3, batch_size=args.batch_size, lr=args.lr,
                         limit=args.limit, seed=args.seed)
    out = args.out or f"checkpoints/{args.model}_{args.dataset}"
    metrics = finetune(args.model, args.dataset, args.data_root, out, cfg, pretrained=args.pretrained,
                       checkpoint=args.checkpoint, device=args.device, autocast=args.autocast,
                       save_every=args.save_every, max_steps=args.max_steps, resume=not args.no_resume,
                       eval_data_root=args.eval_data_root, progress=not args.quiet)
    print(json.dumps(metrics, indent=2))
    return 0


def _train_diffmask(args: argparse.Namespace) -> int:
    import dataclasses
    import shutil
    from pathlib import Path

    from patchbench.bench.config import BenchConfig, check_run_name
    from patchbench.context import RunContext, options_from_run
    from patchbench.methods.diffmask import diffmask_meta
    from patchbench.methods.diffmask_train import DiffMaskConfig, train_or_load, trained_against
    from patchbench.models import OPERATORS, create_operator
    from patchbench.models.zoo import TrainConfig, load_model
    from patchbench.utils import atomic_path

    check_run_name(args.run)
    adapter, meta = load_model(args.model, args.dataset, TrainConfig(seed=args.seed), progress=not args.quiet)
    cfg = DiffMaskConfig(seed=args.seed)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    removal = None
    if args.operator:  # made as a run makes it: with what it takes from the run (mean colour, seed)
        run = RunContext(BenchConfig(model=args.model, datasets=(args.dataset,), seed=args.seed),
                         args.dataset, adapter, meta)
        removal = trained_against(create_operator(args.operator, **options_from_run(
            OPERATORS.get(args.operator), run, {})))
    path = train_or_load(adapter, args.dataset, cfg, progress=not args.quiet, removal=removal)
    tag = removal.name if removal is not None else "placeholder"
    out = Path(args.results_dir) / args.run / f"diffmask_train_{args.dataset}_{tag}.csv"
    with atomic_path(out) as tmp:
        shutil.copyfile(path.with_suffix(".csv"), tmp)
    print(json.dumps({**diffmask_meta(path), "checkpoint": str(path), "log": str(out)}, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from patchbench.bench.config import BenchConfig, read_config
    from patchbench.bench.runner import run_benchmark

    names = {f.name for f in fields(BenchConfig)}
    values = read_config(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if k in names}
    if "plugins" in given:  # --plugin adds to the config's plugins
        given["plugins"] = (*values.get("plugins", ()), *given["plugins"])
    values.update(given)
    from patchbench.methods import plugins

    plugins.load_all(values.get("plugins", ()))  # before the method names are expanded
    cfg = BenchConfig(**values)
    cfg.methods = _expand_methods(cfg.methods)
    cfg.steps = cfg.steps or None
    start = time.perf_counter()
    out = run_benchmark(cfg, progress=not args.quiet)
    if not args.quiet:
        print()
        print(out["markdown"])
        print(f"wrote {out['run_dir']}/ in {time.perf_counter() - start:.0f} s")
    if out["failures"]:
        names = ", ".join(f"{f['method']} ({f['dataset']})" for f in out["failures"])
        print(f"patchbench: error: {len(out['failures'])} method run(s) failed: {names}; the other "
              f"results are in {out['run_dir']}/ (failures.csv)", file=sys.stderr)
        return 1
    return 0
