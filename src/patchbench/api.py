"""``patchbench.evaluate``: the benchmark from Python, with names or objects.

The command line takes names; Python takes names or objects (a model, a dataset or tensors,
method and operator instances) and gets back the results the command line writes from.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from patchbench.bench.config import BenchConfig
from patchbench.bench.runner import Given, run_benchmark
from patchbench.datasets.base import select_samples
from patchbench.methods import METHODS, Method
from patchbench.models.adapter import ImageAdapter, ViTAdapter
from patchbench.models.removal import RemovalOperator
from patchbench.utils import tensor_digest, weights_digest


def evaluate(model: str | nn.Module | ImageAdapter, data: Any,
             methods: Sequence[str | Method | type[Method]] = ("random", "rollout"),
             operators: Sequence[str | RemovalOperator] = ("mean", "drop"), *,
             results_dir: str | Path | None = None, run: str = "evaluate", progress: bool = False,
             **settings: Any) -> dict[str, Any]:
    """Scores attribution methods on a model and data, as ``patchbench bench`` does.

    Args:
        model: A model name (as ``--model``), a classifier ``nn.Module`` (a timm ViT gets the
            token methods and operators) or an adapter.
        data: A dataset name (as ``--datasets``), a folder of class folders (an image folder),
            a dataset object, or tensors ``(images [N, 3, H, W] in [0, 1], labels [N])`` with
            optional ground-truth pixel masks ``[N, H, W]`` as a third item.
        methods: Names or wildcards, :class:`Method` instances (made for this model) or classes.
        operators: Names or removal operator instances.
        results_dir: Where to write the run folder and the stored chunks; None writes nothing
            (the chunks go to a temporary folder).
        run: The run folder's name.
        progress: Progress bars.
        **settings: Any other :class:`BenchConfig` field (``steps``, ``n_images``, ``seed``, ...).

    Returns:
        The results: ``scores`` (tidy rows), ``curves``, ``summary``, ``leaderboard``,
        ``markdown``, ``metric_check``, ``sanity``, ``rank_stability``, ``failures``, ``run``
        (the ``run.json`` record) and ``run_dir``.
    """
    given = Given()
    model_name = model if isinstance(model, str) else _given_model(model, given)
    dataset = _given_data(data, given, settings)
    method_names = [n for m in methods for n in _given_method(m, given)]
    operator_names = [_given_operator(o, given) for o in operators]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = BenchConfig(run=run, model=model_name, datasets=(dataset,), methods=tuple(method_names),
                          operators=tuple(operator_names), results_dir=str(results_dir or tmp),
                          **settings)
        cfg.steps = cfg.steps or None
        return run_benchmark(cfg, progress=progress, given=given)


def _given_model(model: nn.Module | ImageAdapter, given: Given) -> str:
    if isinstance(model, ImageAdapter):
        adapter = model
    else:
        vit = all(hasattr(model, a) for a in ("patch_embed", "blocks", "num_prefix_tokens", "_pos_embed"))
        adapter = (ViTAdapter if vit else ImageAdapter)(model)
    name = f"{type(adapter.model).__name__}-{weights_digest(adapter.model)[:12]}"
    adapter.key = adapter.key or name
    given.model = (adapter, {"key": adapter.key, "arch": type(adapter.model).__name__, "given": True})
    return adapter.key


def _given_data(data: Any, given: Given, settings: dict[str, Any]) -> str:
    if isinstance(data, str | Path) and Path(data).is_dir():
        settings["data_root"] = str(data)
        return "imagefolder"
    if isinstance(data, str):
        return data
    if isinstance(data, tuple | list):
        images, labels, *rest = data
        masks = rest[0] if rest else torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
        name = "data"
    else:  # a dataset object: its own tensors
        images, labels, masks = data.tensors()
        name = getattr(data, "name", type(data).__name__)
    images, labels, masks = torch.as_tensor(images).float(), torch.as_tensor(labels), torch.as_tensor(masks)
    _check_samples(images, labels, masks)
    ids = list(range(len(images)))
    n = settings.setdefault("n_images", len(ids))
    if n < len(ids):
        ids = select_samples(labels, n, settings.get("seed", 0))
    source = {"given": name, "sha256": tensor_digest(images, labels, masks)[:24]}
    given.samples = (images[ids], labels[ids], masks[ids].bool(), ids, source)
    return name


def _check_samples(images: Tensor, labels: Tensor, masks: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W] in [0, 1], got {list(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"expected labels [{images.shape[0]}], got {list(labels.shape)}")
    if masks.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"expected masks [{images.shape[0]}, {images.shape[2]}, {images.shape[3]}], "
                         f"got {list(masks.shape)}")
    if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError("images must be finite pixel values in [0, 1] (they are normalised by the model's "
                         "adapter)")


def _given_method(method: str | Method | type[Method], given: Given) -> list[str]:
    if isinstance(method, str):  # a name, or a wildcard as on the command line
        return METHODS.list(method) if any(c in method for c in "*?[") else [method]
    if not (isinstance(method, Method) or (isinstance(method, type) and issubclass(method, Method))):
        raise TypeError(f"methods are names, Method instances or Method classes, got {method!r}")
    given.methods[method.name] = method
    return [method.name]


def _given_operator(operator: str | RemovalOperator, given: Given) -> str:
    if isinstance(operator, str):
        return operator
    if not isinstance(operator, RemovalOperator):
        raise TypeError(f"operators are names or RemovalOperator instances, got {operator!r}")
    given.operators[operator.name] = operator
    return operator.name
