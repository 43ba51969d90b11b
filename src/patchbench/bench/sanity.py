"""Cascading model-parameter randomisation (Adebayo et al., 2018, "Sanity Checks for Saliency Maps").

An explanation of a model must change when the model does. The check re-initialises the
model from the top down, one stage more at a time (the head, then the last block, ... down
to the first block), and compares each method's maps on the randomised copy with its maps
on the trained model by their Spearman rank correlation, image by image. A method whose
maps still correlate strongly once everything is random fails: it shows the image, not the
model. The target class stays the trained model's, as in the paper.

The pieces are usable alone (the benchmark runner stores the correlations itself)::

    stages = randomisation_stages(adapter)        # ["head", "block 11", ..., "block 0"]
    copy = randomised_copy(adapter, 3, seed=0)    # head, block 11 and block 10 random
    rho = map_similarity(maps_trained, maps_copy) # [B]

or all at once::

    frame = randomisation_check(adapter, {"gradcam": lambda a: create_method("gradcam", a)},
                                images, target)
    sanity_verdicts(frame)                        # method, final_spearman, verdict
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from patchbench.metrics.stats import bootstrap_ci

THRESHOLD = 0.5  # mean Spearman with everything randomised, below which a method passes

# Modules that map the last block's tokens to logits. timm ViTs: the final norm (``norm``, or
# ``fc_norm`` after pooling), attention pooling (global_pool="map"), the classifier and DeiT's
# distillation classifier. Hugging Face ViTs sit behind ``HFLogits`` as ``hf``.
_HEAD_PATHS = ("norm", "fc_norm", "attn_pool", "head", "head_dist",
               "hf.vit.layernorm", "hf.vit.pooler", "hf.classifier")


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _head_modules(model: nn.Module) -> list[nn.Module]:
    found: list[nn.Module] = []
    for path in _HEAD_PATHS:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if _has_parameters(module):
            found.append(module)
    if not found and callable(getattr(model, "get_classifier", None)):
        classifier = model.get_classifier()  # a tuple for timm's distilled models
        found = [m for m in (classifier if isinstance(classifier, tuple) else (classifier,))
                 if isinstance(m, nn.Module) and _has_parameters(m)]
    if not found:
        raise ValueError(f"{type(model).__name__}: found no classifier head with parameters "
                         f"(looked for {', '.join(_HEAD_PATHS)} and get_classifier())")
    return found


EMBEDDING_PARAMETERS = ("pos_embed", "cls_token", "reg_token", "dist_token")


def _stage_modules(adapter: Any) -> list[tuple[str, list[nn.Module | nn.Parameter]]]:
    """(name, modules or parameters) per stage, top down.

    A ViT: the head (classifier with the final norm), then each block from the last to the
    first, then the embedding (patch embedding, position embeddings and prefix tokens), so
    that at the last stage nothing of the trained model is left, as in Adebayo et al.

    Any other model is staged by its top-level children that hold parameters, in reverse
    order, named by attribute (a timm ResNet: ``fc``, ``layer4``, ..., ``bn1``, ``conv1``).
    """
    model = adapter.model
    if adapter.is_vit:
        blocks = [(f"block {i}", [b]) for i, b in reversed(list(enumerate(adapter.blocks)))]
        embedding = [m for m in (getattr(model, "patch_embed", None),) if isinstance(m, nn.Module)]
        embedding += [p for name in EMBEDDING_PARAMETERS
                      if isinstance(p := getattr(model, name, None), nn.Parameter)]
        return [("head", _head_modules(model)), *blocks, *([("embedding", embedding)] if embedding else [])]
    children = [(name, [m]) for name, m in model.named_children() if _has_parameters(m)]
    return list(reversed(children))


def randomisation_stages(adapter: Any) -> list[str]:
    """Names of the cumulative stages, top down.

    A ViT gives ``["head", "block L-1", ..., "block 0", "embedding"]``; another model its top-level
    children that hold parameters, last first (see :func:`randomised_copy`). Stage ``k``
    (1-based) of the check randomises the first ``k`` of them.

    Args:
        adapter: An :class:`~patchbench.models.adapter.ImageAdapter` (or ViT adapter).
    """
    return [name for name, _ in _stage_modules(adapter)]


@contextmanager
def _private_rng(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seeds the CPU generator (and ``device``'s, if a GPU) inside a fork: deterministic draws,
    and the caller's random state is the same afterwards.

    ``torch.manual_seed`` would also re-seed every GPU, which ``fork_rng`` restores only for
    the devices it forked; so only the generators that are forked are seeded.
    """
    cuda = device is not None and device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def _reinitialise(module: nn.Module) -> None:
    """Fresh random parameters for ``module`` and everything in it, drawn from the global
    (CPU) generator.

    Layers with an initialiser (``reset_parameters``: linear, convolution, norm layers,
    timm's LayerScale) use it; norm layers thereby return to their identity init (weight 1,
    bias 0) and batch norms also forget their running statistics. A parameter no such layer
    owns is re-drawn from a truncated normal with std 0.02 (timm's ViT initialisation).
    """
    covered: set[int] = set()
    for sub in module.modules():  # parents first: a child's own initialiser has the last word
        if callable(getattr(sub, "reset_parameters", None)):
            sub.reset_parameters()
            covered |= {id(p) for p in sub.parameters(recurse=False)}
    for p in module.parameters():
        if id(p) not in covered:
            nn.init.trunc_normal_(p, std=0.02)


def randomised_copy(adapter: Any, stages: int, seed: int = 0) -> Any:
    """A deep copy of ``adapter`` with its first ``stages`` stages re-initialised.

    Stage ``k`` (0-based) is drawn with seed ``seed + k`` from a private generator, on a float32
    CPU copy of its modules that is then loaded into the model: copies are deterministic,
    the same on any device, cumulative (the copy with ``k + 1`` stages shares the first ``k``
    stages' draws), and the global random state is untouched. The original model is never
    modified; the copy keeps its key, so checkpoints tied to the model (DiffMask) still load.

    Args:
        adapter: The trained model's adapter.
        stages: How many stages of :func:`randomisation_stages`, from the top, to randomise
            (0: an unchanged copy).
        seed: Base seed.

    Returns:
        The randomised adapter (of the same class), on the original's device, in eval mode.
    """
    names = randomisation_stages(adapter)
    if not 0 <= stages <= len(names):
        raise ValueError(f"stages must be in [0, {len(names)}] for this model, got {stages}")
    out = copy.deepcopy(adapter)
    for k, (_, modules) in enumerate(_stage_modules(out)[:stages]):
        with _private_rng(seed + k), torch.no_grad():
            for module in modules:
                if isinstance(module, nn.Parameter):  # a ViT's position embedding or token
                    fresh = nn.init.trunc_normal_(torch.empty(module.shape), std=0.02)
                    module.copy_(fresh)
                    continue
                fresh = copy.deepcopy(module).to("cpu").float()
                _reinitialise(fresh)
                module.load_state_dict(fresh.state_dict())  # copies into the device and dtype
    return out


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (1-based) along the last dimension; ties share the mean of their ranks."""
    # hand-written rather than scipy.stats.spearmanr: batched over every image in one call,
    # and with a defined value for constant maps (scipy returns NaN and warns)
    s = x.sort(-1).values
    # the tied run of a value occupies sorted positions left+1 ... right
    left = torch.searchsorted(s, x, right=False)
    right = torch.searchsorted(s, x, right=True)
    return (left + right + 1).double() / 2


def map_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Per-image Spearman rank correlation between two sets of maps.

    Ties get average ranks, so a map with ties is not ranked arbitrarily. Spearman is
    undefined for a constant map; here two constant maps count as unchanged (1.0) and a
    constant map against a varying one as unrelated (0.0).

    Args:
        a: Maps ``[B, Hp, Wp]`` (or ``[B, P]``), finite.
        b: Maps of the same shape.

    Returns:
        ``[B]`` float32 in [-1, 1], on the CPU.
    """
    if a.shape != b.shape:
        raise ValueError(f"maps to compare must have one shape, got {list(a.shape)} and {list(b.shape)}")
    x = a.detach().flatten(1).double().cpu()
    y = b.detach().flatten(1).double().cpu()
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("maps to compare must be finite")
    dx = _ranks(x)
    dy = _ranks(y)
    dx, dy = dx - dx.mean(1, keepdim=True), dy - dy.mean(1, keepdim=True)
    flat_x = (x == x[:, :1]).all(1)
    flat_y = (y == y[:, :1]).all(1)
    denom = ((dx * dx).sum(1) * (dy * dy).sum(1)).sqrt()
    rho = ((dx * dy).sum(1) / denom.where(denom > 0, torch.ones_like(denom))).clamp(-1, 1)
    rho = torch.where(flat_x | flat_y, (flat_x & flat_y).double(), rho)
    return rho.float()


def sanity_rows(rho: Tensor, methods: list[str], stages: list[str], base: dict[str, Any],
                seed: int = 0, threshold: float = THRESHOLD,
                errors: Mapping[str, str] | None = None,
                not_applicable: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Tidy rows of the check: one per method and stage, with the method's verdict.

    Args:
        rho: ``[M, K, n]`` Spearman correlations per method, cumulative stage and image
            (NaN where the method failed on that model).
        methods: The M method names.
        stages: The K stage names, top down.
        base: Columns repeated on every row (dataset, model, ...).
        seed: Seed of the bootstrap intervals.
        threshold: A method passes when its mean correlation at the last stage (the whole
            model random) is below this.
        errors: Method -> why it failed (its verdict becomes ``"error: <why>"``).
        not_applicable: Method -> why the check does not apply to it (its verdict becomes
            ``"not applicable: <why>"``; its correlations are NaN).

    Returns:
        Rows ``method, stage, stage_index, spearman, spearman_ci_low, spearman_ci_high, n,
        threshold, verdict`` (``stage_index`` 1 … K; ``spearman`` the mean over images with a
        95% percentile-bootstrap interval; ``n`` the images it is over). The verdict,
        ``pass``, ``fail`` or ``error[: why]``, is the same on all rows of a method: a method
        missing any correlation is an error, since its check is incomplete.
    """
    errors = errors or {}
    rows = []
    for i, method in enumerate(methods):
        final = rho[i, -1]
        if method in (not_applicable or {}):
            verdict = f"not applicable: {not_applicable[method]}"
        elif method in errors:
            verdict = f"error: {errors[method]}"
        elif rho[i].isnan().any():
            verdict = "error"
        else:
            verdict = "pass" if float(final.mean()) < threshold else "fail"
        for k, stage in enumerate(stages):
            values = rho[i, k].double().numpy()
            ok = values[~np.isnan(values)]
            low, high = bootstrap_ci(ok, seed=seed) if len(ok) else (float("nan"),) * 2
            rows.append({**base, "method": method, "stage": stage, "stage_index": k + 1,
                         "spearman": float(ok.mean()) if len(ok) else float("nan"),
                         "spearman_ci_low": low, "spearman_ci_high": high, "n": len(ok),
                         "threshold": threshold, "verdict": verdict})
    return rows


def sanity_verdicts(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per method: ``method, final_spearman, verdict`` (plus any grouping columns
    such as dataset and model), from the rows of :func:`randomisation_check`.

    ``final_spearman`` is the mean correlation with everything randomised (the last stage).
    """
    keys = [c for c in ("dataset", "model") if c in frame.columns] + ["method"]
    last = frame[frame.stage_index == frame.stage_index.max()]
    out = last[keys + ["spearman", "verdict"]].rename(columns={"spearman": "final_spearman"})
    return out.reset_index(drop=True)


def _attribute(method: Any, images: Tensor, target: Tensor, batch_size: int | None,
               seed: int) -> Tensor:
    """All maps of a method, ``[n, Hp, Wp]`` on the CPU, with the random state seeded: a
    stochastic method then draws the same noise for the trained and each randomised model,
    so only the model differs, and the caller's random state is left alone."""
    size = batch_size or len(images)
    with _private_rng(seed, images.device):
        return torch.cat([method.attribute(x, t).cpu()
                          for x, t in zip(images.split(size), target.split(size))])


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0]


def randomised_correlations(
    adapter: Any,
    methods: Mapping[str, Callable[[Any], Any]],
    images: Tensor,
    target: Tensor,
    seed: int = 0,
    progress: bool = False,
    batch_size: int | None = None,
    desc: str = "sanity check",
) -> tuple[Tensor, dict[str, str]]:
    """Spearman correlations between each method's maps on the trained model and on every
    cumulative randomisation stage.

    For every stage ``k = 1 … K`` a fresh :func:`randomised_copy` with ``k`` stages is made
    (one at a time: a large model is not held K times), every method is created for it by
    its factory and its maps are compared with the trained ones per image. A method that
    raises gets NaN correlations and an entry in the errors; the others go on.

    Args:
        adapter: The trained model's adapter (left unchanged).
        methods: Name -> factory creating the method for a given adapter.
        images: Model inputs ``[n, 3, H, W]``.
        target: Class per image ``[n]``, kept for the randomised models.
        seed: Seed of the re-initialisation and of the methods' own randomness.
        progress: Show a progress bar over stages x methods.
        batch_size: Images per ``attribute`` call (default: all at once).
        desc: Label of the progress bar.

    Returns:
        ``[M, K, n]`` correlations in the order of ``methods``, and method -> why it failed.
    """
    if target.shape != (len(images),):
        raise ValueError(f"expected target [{len(images)}], got {list(target.shape)}")
    names = list(methods)
    stages = randomisation_stages(adapter)
    errors: dict[str, str] = {}
    maps_before: dict[str, Tensor] = {}
    for name in names:
        try:
            maps_before[name] = _attribute(methods[name](adapter), images, target, batch_size, seed)
        except Exception as e:  # one method's failure must not cost the others' checks
            errors[name] = f"trained model: {_reason(e)}"
    rho = torch.full((len(names), len(stages), len(images)), torch.nan)
    bar = tqdm(total=len(names) * len(stages), desc=desc, disable=not progress, leave=False)
    for k in range(1, len(stages) + 1):
        randomised = randomised_copy(adapter, k, seed)
        for i, name in enumerate(names):
            bar.set_postfix_str(f"{name} +{stages[k - 1]}", refresh=False)
            if name in maps_before:
                try:
                    maps = _attribute(methods[name](randomised), images, target, batch_size, seed)
                    rho[i, k - 1] = map_similarity(maps_before[name], maps)
                except Exception as e:
                    errors.setdefault(name, f"{stages[k - 1]} randomised: {_reason(e)}")
            bar.update()
        del randomised
    bar.close()
    return rho, errors


def randomisation_check(
    adapter: Any,
    methods: Mapping[str, Callable[[Any], Any]],
    images: Tensor,
    target: Tensor,
    seed: int = 0,
    threshold: float = THRESHOLD,
    progress: bool = False,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Runs the cascading randomisation check for several methods on one model.

    Args:
        adapter: The trained model's adapter (left unchanged).
        methods: Name -> factory creating the method for a given adapter, e.g.
            ``{"diffmask": lambda a: create_method("diffmask", a, checkpoint=path)}``.
        images: Model inputs ``[n, 3, H, W]`` (n >= 2 for a confidence interval).
        target: Class per image ``[n]``; kept for the randomised models (normally the trained
            model's prediction).
        seed: Seed of the re-initialisation, of methods' own randomness and of the bootstrap.
        threshold: A method passes when its mean Spearman with everything randomised is
            below this; maps that hardly change with the model fail.
        progress: Show a progress bar over stages x methods.
        batch_size: Images per ``attribute`` call (default: all at once).

    Returns:
        Tidy rows (see :func:`sanity_rows`): ``method, stage, stage_index, spearman,
        spearman_ci_low, spearman_ci_high, n, threshold, verdict``, K rows per method in stage
        order; a method that raised has NaN correlations and verdict ``"error: <why>"``.
        :func:`sanity_verdicts` gives one row per method.
    """
    rho, errors = randomised_correlations(adapter, methods, images, target, seed=seed,
                                          progress=progress, batch_size=batch_size)
    return pd.DataFrame(sanity_rows(rho, list(methods), randomisation_stages(adapter), {}, seed,
                                    threshold, errors))
