"""Run configuration (kept free of heavy imports so the command line starts fast)."""

from __future__ import annotations

import difflib
import inspect
import re
import tomllib
import types
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

DEFAULT_METHODS = ("random", "centre", "constant", "attention", "rollout", "chefer", "gradcam",
                   "integrated_gradients", "smoothgrad", "occlusion", "rise", "attnlrp", "diffmask")


def setting(default: Any = None, help: str = "", *, flags: tuple[str, ...] = (),
            choices: tuple[str, ...] | None = None, repeat: bool = False,
            factory: Callable[[], Any] | None = None, cli: bool = True) -> Any:
    """One declared setting: its default, its help, its command-line flags and its allowed
    values. The command line, the config-file check and :meth:`BenchConfig.validate` are all
    derived from these declarations.

    Args:
        default: The default value.
        help: What it sets (the default is appended on the command line).
        flags: Its command-line flags (default: ``--name`` with dashes).
        choices: The allowed values, if a closed set.
        repeat: A list given one value per flag (``--plugin a --plugin b``), not comma-separated.
        factory: For mutable defaults, a function making the default.
        cli: Whether it is a command-line option (tables are set in config files only).
    """
    meta = {"help": help, "flags": flags, "choices": choices, "repeat": repeat, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class BenchConfig:
    """Everything that fixes a run (it is written to ``run.json``). Each field is declared once,
    here; the command line and the config-file check are derived from these declarations."""

    run: str = setting("default", "run name: results go to RESULTS_DIR/RUN; under torchrun write "
                       "--run-name, as torchrun takes --run for its own --run-path",
                       flags=("--run", "--run-name"))
    model: str = setting("pb-vit-tiny", "embedded model (pb-vit-tiny, trained per dataset), any timm "
                         "model name, or hf:<hub id or folder> for a Hugging Face ViT")
    pretrained: bool = setting(False, "timm model: load timm's pretrained weights")
    checkpoint: str | None = setting(None, "timm model: local .safetensors/.pth weights")
    data_root: str | None = setting(None, "folder of a dataset read from disk (cifar10, imagefolder)")
    datasets: tuple[str, ...] = setting(("glyphs", "toy-count"), "comma-separated dataset names")
    methods: tuple[str, ...] = setting(DEFAULT_METHODS, "comma-separated method names or wildcards")
    operators: tuple[str, ...] = setting(("mean", "drop"), "comma-separated removal operators")
    scores: tuple[str, ...] = setting((), "comma-separated scores shown as leaderboard columns, in "
                                      "order (default: SRG and the p and KL AUCs; AUROC, pointing "
                                      "game and mass); scores.csv always has them all")
    n_images: int = setting(200, "images per dataset, stratified over classes",
                            flags=("--n-images", "--limit"))
    steps: int | None = setting(16, "steps per curve, 0 = one per patch")
    seed: int = setting(0, "seed for everything")
    train_seeds: int = setting(1, "seeds each trained method (DiffMask) is trained with (seed, seed+1, "
                               "...): each is scored; tables show the mean over them and their range")
    target: str = setting("prediction", "class whose probability is tracked",
                          choices=("prediction", "label"))
    batch_size: int = setting(50, "images per attribution call")
    gallery_size: int = setting(8, "images per dataset in report.html's gallery")
    sanity_images: int = setting(16, "images per dataset for the model-randomisation sanity check, "
                                 "0 = skip it")
    sanity_train_steps: int = setting(100, "training steps of a trained method (DiffMask) retrained "
                                      "for the sanity check on the trained model and on each "
                                      "randomised copy; 0 = mark it not applicable")
    chunk_size: int | None = setting(None, "most (image, step) rows prepared per pass (default: 64 on "
                                     "CPU, 1024 on GPU)")
    memory_budget: str | None = setting(None, "working memory for the curves' forward passes, e.g. "
                                        "512MiB or 4GB: the rows per pass are chosen to fit it (at "
                                        "most --chunk-size); scores do not change")
    results_dir: str = setting("results", "folder of the run folders and the stored chunks")
    maps: tuple[str, ...] = setting((), "score maps computed elsewhere, as method maps:<file stem>: a "
                                    ".pt/.npz/.safetensors file of sample id -> [Hp, Wp], or [N, Hp, Wp] "
                                    "in sample order (repeatable)", flags=("--maps",), repeat=True)
    plugins: tuple[str, ...] = setting((), "load a plugin: path/to/file.py or module:object "
                                       "(repeatable; adds to the config's)", flags=("--plugin",),
                                       repeat=True)
    overwrite: str = setting("missing", "stored results (RESULTS_DIR/.chunks): reuse and compute what "
                             "is missing, recompute all, or compute nothing new",
                             choices=("never", "missing", "always"))
    device: str = setting("auto", "auto, cpu, cuda or cuda:N (auto = cuda if present)")
    autocast: str | None = setting(None, "mixed precision on GPU (default: off)", choices=("bf16", "fp16"))
    train_data_root: str | None = setting(None, "train split for DiffMask when it is another folder "
                                          "(imagefolder)")
    method_options: dict[str, dict[str, Any]] = setting(factory=dict, cli=False,
                                                        help="[method_options.<method>] tables")
    operator_options: dict[str, dict[str, Any]] = setting(factory=dict, cli=False,
                                                          help="[operator_options.<operator>] tables")
    dataset_options: dict[str, dict[str, Any]] = setting(factory=dict, cli=False,
                                                         help="[dataset_options.<dataset>] tables")
    diffmask_config: dict[str, Any] = setting(factory=dict, cli=False, help="DiffMaskConfig overrides")

    def validate(self, given: set[str] = frozenset()) -> None:
        """Fails early, before any training or scoring, on an unknown name or bad value.

        Args:
            given: Names that Python callers gave as objects (not looked up in registries).
        """
        check_types(vars(self))
        check_run_name(self.run)
        self._check_values()
        self._check_names(given)

    def _check_values(self) -> None:
        if self.steps is not None and self.steps < 2:
            raise ValueError(f"steps must be 0 (one step per patch) or at least 2, got {self.steps}: "
                             "a curve needs a point between 'nothing removed' and 'all removed'")
        for f in fields(self):
            allowed = f.metadata.get("choices")
            value = getattr(self, f.name)
            if allowed and value is not None and value not in allowed:
                raise ValueError(f"{f.name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.train_seeds < 1:
            raise ValueError(f"train_seeds must be at least 1, got {self.train_seeds}")
        if self.n_images < 2:
            raise ValueError(f"n_images must be at least 2, got {self.n_images}")
        for name in ("gallery_size", "sanity_images", "sanity_train_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {self.chunk_size}")
        if self.memory_budget is not None:
            from patchbench.memory import parse_bytes

            parse_bytes(self.memory_budget)
        if self.device != "auto":
            import torch

            torch.device(self.device)  # raises on a malformed name
            if self.device.startswith("cuda") and not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} asked for, but CUDA is not available here")

    def _check_names(self, given: set[str]) -> None:
        """Every named component exists (a typo lists the valid names) and takes its options."""
        # imported here, not at the top: the registries import torch, and the config is read
        # by `patchbench --help`, which answers without it
        from patchbench.datasets import DATASETS
        from patchbench.methods import METHODS
        from patchbench.methods.diffmask_train import DiffMaskConfig
        from patchbench.metrics.scores import SCORES
        from patchbench.models import MODELS, OPERATORS

        if self.model not in MODELS and not self.model.startswith("hf:") and self.model not in given:
            import timm

            if not timm.is_model(self.model):
                MODELS.get(self.model)  # raises, listing the embedded models
        for name in self.scores:
            SCORES.get(name)  # raises, listing the valid names
        for names, registry in ((self.datasets, DATASETS), (self.methods, METHODS),
                                (self.operators, OPERATORS)):
            for name in names:
                if name not in given:
                    registry.get(name)
        known = {f.name for f in fields(DiffMaskConfig)}
        unknown = sorted(set(self.diffmask_config) - known)
        if unknown:
            raise ValueError(f"unknown diffmask_config keys {unknown}; valid: {', '.join(sorted(known))}")
        for kind, options, registry in (("method", self.method_options, METHODS),
                                        ("operator", self.operator_options, OPERATORS),
                                        ("dataset", self.dataset_options, DATASETS)):
            for name, opts in options.items():
                check_options(f"{kind}_options.{name}", registry.get(name), opts)


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_run_name(name: str) -> None:
    """A run name names one folder inside the results folder, nothing else."""
    if not RUN_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"run name {name!r} is not allowed: it names a folder inside --results-dir, "
                         "so use letters, digits, '.', '_' and '-', starting with a letter or digit "
                         "(no '/', '..', empty or absolute names)")


def check_options(where: str, factory: Any, options: Any) -> None:
    """Option names must be parameters of the component's constructor (or it takes ``**kwargs``)."""
    if not isinstance(options, dict):
        raise ValueError(f"{where} must be a table of options, got {options!r}")
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items()
             if n != "adapter" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown option {key!r}{hint}; valid options: "
                             f"{', '.join(valid) or 'none'}")


def check_types(values: dict[str, Any], where: str = "config") -> None:
    """Each value must have its field's declared type (TOML and Python callers alike).

    Raises:
        ValueError: Naming the key, the type expected and the value found, e.g.
            ``n_images must be an integer, got 'twenty'``.
    """
    hints = get_type_hints(BenchConfig)
    for key, value in values.items():
        if key not in hints or _matches(value, hints[key]):
            continue
        tp = hints[key]
        if get_origin(tp) is dict and isinstance(value, dict):  # name the entry that is wrong
            bad = next(k for k, v in value.items() if not _matches(v, get_args(tp)[1]))
            key, value, tp = f"{key}.{bad}", value[bad], get_args(tp)[1]
        example = (f"; e.g. {key} = [{value!r}]".replace("'", '"')
                   if get_origin(tp) is tuple and isinstance(value, str) else "")
        raise ValueError(f"{where}: {key} must be {_describe(tp)}, got {value!r}{example}")


def _matches(value: Any, tp: Any) -> bool:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, tuple | list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _matches(v, args[1])
                                               for k, v in value.items())
    if tp in (int, float):  # bool is an int to Python, never to a config
        return isinstance(value, int if tp is int else int | float) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is tuple:
        return f"a list of {_describe(args[0]).removeprefix('a ')}s"
    if origin is dict:
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def config_names() -> list[str]:
    """The run configs shipped inside the package (``patchbench/configs/*.toml``)."""
    return sorted(p.name.removesuffix(".toml") for p in resources.files("patchbench").joinpath(
        "configs").iterdir() if p.name.endswith(".toml"))


def read_config(path_or_name: str | Path) -> dict[str, Any]:
    """Reads a TOML run config: a file path, or the name of a shipped config (``paper-cifar10``).

    Names resolve inside the installed package, so they work from any folder.

    Returns:
        The fields it sets (lists become tuples); unknown keys and values of the wrong type
        are refused, naming the key, so a typo never silently falls back to a default.
    """
    path = Path(path_or_name)
    if not path.is_file():
        if str(path_or_name) not in config_names():
            raise FileNotFoundError(f"no config file {str(path_or_name)!r}, and no shipped config of "
                                    f"that name; shipped configs: {', '.join(config_names())}")
        path = Path(str(resources.files("patchbench").joinpath("configs", f"{path_or_name}.toml")))
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    names = {f.name for f in fields(BenchConfig)}
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{path}: unknown key {key!r}{hint}; valid keys: {', '.join(sorted(names))}")
    check_types(raw, str(path))
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}


@dataclass
class SpeedConfig:
    """What ``patchbench speed`` measures on (defaults: the default benchmark's model)."""

    model: str = "pb-vit-tiny"
    dataset: str = "glyphs"
    n_images: int = 64
    steps: int | None = None  # one patch per step: the granularity Quantus works at
    methods: tuple[str, ...] = DEFAULT_METHODS
    operators: tuple[str, ...] = ("mean", "blur", "drop")
    batch_size: int = 32  # images per attribution call
    chunk_size: int | None = None  # as in `bench`: 64 rows on CPU, 1024 on GPU
    memory_budget: str | None = None
    slow_images: int | None = None  # images for the naive loop and Quantus (default: all)
    quantus: bool = True
    repeats: int = 3
    device: str = "auto"
    autocast: str | None = None
    seed: int = 0
    out: str = "results/speed"
