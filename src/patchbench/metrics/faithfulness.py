"""Faithfulness curves: deletion, insertion and LeRF, batched over images x steps.

Each (image, step) pair is one row; rows are run through the removal operator in chunks,
so the cost is that of the forward passes themselves. The clean forward pass and the
"everything removed" pass do not depend on the map: they are computed once per image
(:func:`prepare_reference`) and shared by every method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from patchbench.metrics.functional import (
    CURVES,
    keep_masks,
    kl_divergence,
    patch_ranking,
    step_counts,
)
from patchbench.metrics.scores import faithfulness_scores
from patchbench.models.adapter import ViTAdapter
from patchbench.models.removal import RemovalOperator


@dataclass
class Reference:
    """What every method's curves share for one set of images and one operator.

    Attributes:
        logits_clean: Logits of the clean images ``[B, C]``.
        logits_empty: Logits with every patch removed ``[B, C]``.
        state: The operator's per-image state (e.g. baseline images), or None.
    """

    logits_clean: Tensor
    logits_empty: Tensor
    state: Tensor | None

    @property
    def logp_clean(self) -> Tensor:
        return self.logits_clean.log_softmax(-1)


QUANTITIES = ("prob", "kl", "logit", "correct")  # what a curve records at every point


@dataclass
class Curves:
    """Per-image curves: each quantity's ``[curve]`` is ``[B, S + 1]`` over ``x``.

    Attributes:
        x: Fraction of patches removed (deletion, LeRF) or inserted (insertion), ``[S + 1]``.
        prob: Probability of the target class at every point.
        kl: KL(p_clean ‖ p_step) at every point.
        logit: The target class's logit at every point.
        correct: 1 where the target class is the top-1 prediction, else 0 (averaged over
            images, an accuracy curve).
    """

    x: Tensor
    prob: dict[str, Tensor]
    kl: dict[str, Tensor]
    logit: dict[str, Tensor]
    correct: dict[str, Tensor]

    def scores(self) -> dict[str, Tensor]:
        """Every declared faithfulness score these curves allow, each ``[B]``: the AUCs
        (trapezoid over ``x`` in [0, 1]), SRG, and any score a plugin registers."""
        return faithfulness_scores(self)


# On a CPU every forward pass of the harness runs exactly this many rows (the last one padded):
# measured on the default model, a row's logits differ by up to 5e-7 between passes of 1-5
# rows and of 6 or more, which moved scores with --chunk-size, --memory-budget and the other
# images of the run. With one shape for every pass, scores are byte-identical whatever those
# are. 32 rows ran at 94% of the speed of 64 (the fastest) on the default model.
CPU_FORWARD_ROWS = 32


def forward_rows(device: torch.device) -> int | None:
    """Rows per forward pass of the harness: fixed on a CPU, free on a GPU (see above)."""
    return CPU_FORWARD_ROWS if device.type == "cpu" else None


@torch.no_grad()
def clean_logits(adapter: ViTAdapter, images: Tensor, chunk_size: int = 256) -> Tensor:
    """The model's logits ``[B, C]`` (float32), in chunks."""
    with adapter.fixed_rows(forward_rows(images.device)):
        return torch.cat([adapter.logits(x).float() for x in images.split(chunk_size)])


@torch.inference_mode()  # its outputs only ever feed the curves, never autograd
def prepare_reference(adapter: ViTAdapter, operator: RemovalOperator, images: Tensor,
                      seeds: Tensor, chunk_size: int = 256,
                      logits_clean: Tensor | None = None) -> Reference:
    """Clean and all-removed logits and the operator's state, once per image.

    Args:
        adapter: The model.
        operator: The removal operator.
        images: Model inputs ``[B, 3, H, W]``.
        seeds: Per-image seeds ``[B]`` (e.g. dataset sample ids) for random baselines.
        chunk_size: Rows per forward pass.
        logits_clean: Clean logits if already computed (shared across operators).
    """
    if logits_clean is None:
        logits_clean = clean_logits(adapter, images, chunk_size)
    state = operator.prepare(adapter, images, seeds)
    none_kept = torch.zeros(images.shape[0], adapter.num_patches, dtype=torch.bool,
                            device=images.device)
    empty = []
    with adapter.fixed_rows(forward_rows(images.device)):
        for rows in torch.arange(images.shape[0]).split(chunk_size):
            logits = operator(adapter, images[rows], none_kept[rows],
                              None if state is None else state[rows])
            empty.append(logits.float())
    return Reference(logits_clean, torch.cat(empty), state)


@torch.inference_mode()
def faithfulness_curves(adapter: ViTAdapter, operator: RemovalOperator, images: Tensor,
                        target: Tensor, maps: Tensor, reference: Reference,
                        steps: int | None = None, chunk_size: int = 256,
                        progress: bool = False, curves: tuple[str, ...] = CURVES) -> Curves:
    """Deletion, insertion and LeRF curves of target probability and KL for every image.

    Args:
        adapter: The model.
        operator: How patches are removed.
        images: Model inputs ``[B, 3, H, W]``.
        target: Class whose probability is tracked ``[B]``.
        maps: Relevance ``[B, Hp, Wp]``; patches are ordered by it, ties by patch index.
        reference: From :func:`prepare_reference` for the same images and operator.
        steps: Number of steps (``None``: one per patch); see :func:`step_counts`.
        chunk_size: (image, step) rows per forward pass.
        progress: Show a progress bar.
        curves: Which curves to compute (LeRF costs nothing once insertion is computed).

    Returns:
        :class:`Curves` with ``S + 1`` points per image and curve.
    """
    unknown = set(curves) - set(CURVES)
    if unknown:
        raise ValueError(f"unknown curves {sorted(unknown)}; valid curves: {', '.join(CURVES)}")
    runs = [c for c in ("deletion", "insertion") if c in curves or (c == "insertion" and "lerf" in curves)]
    b, p = images.shape[0], adapter.num_patches
    counts = step_counts(p, steps)
    rank = patch_ranking(maps.to(images.device))
    interior = counts[1:-1]
    # rows: curve-major, then step, then image, so a chunk holds few distinct kept counts
    # (the 'drop' operator runs one sequence length at a time)
    jobs = [(curve, j) for curve in runs for j in range(len(interior))]
    n_rows = len(jobs) * b
    logits = torch.empty(n_rows, reference.logits_clean.shape[1], device=images.device)
    row_img = torch.arange(b, device=images.device).repeat(len(jobs))
    masks = {c: keep_masks(rank, interior, c) for c in runs}
    row_keep = torch.cat([masks[c][:, j] for c, j in jobs])  # [n_rows, P]
    bar = tqdm(total=n_rows, desc=f"curves ({operator.name})", disable=not progress, leave=False)
    with adapter.fixed_rows(forward_rows(images.device)):
        for rows in torch.arange(n_rows, device=images.device).split(chunk_size):
            img = row_img[rows]
            state = None if reference.state is None else reference.state[img]
            logits[rows] = operator(adapter, images[img], row_keep[rows], state).float()
            bar.update(len(rows))
    bar.close()
    logits = logits.view(len(runs), len(interior), b, -1)
    clean, empty = reference.logits_clean, reference.logits_empty
    ends = {"deletion": (clean, empty), "insertion": (empty, clean)}
    points = {c: torch.stack([ends[c][0], *logits[i], ends[c][1]], 1) for i, c in enumerate(runs)}
    if "lerf" in curves:
        # LeRF removes from the back of the same ranking: removing c patches keeps the top
        # P - c, i.e. the insertion point at P - c; the symmetric grid makes that c[S - j]
        points["lerf"] = points["insertion"].flip(1)
    points = {c: points[c] for c in CURVES if c in curves}
    return Curves(counts.float() / p, **curve_quantities(points, clean, target.to(images.device)))


def curve_quantities(points: dict[str, Tensor], clean: Tensor,
                     target: Tensor) -> dict[str, dict[str, Tensor]]:
    """Every quantity of :data:`QUANTITIES` from the logits at every point of every curve.

    Args:
        points: Curve -> logits ``[B, S + 1, C]``.
        clean: Clean logits ``[B, C]``.
        target: Tracked class per image ``[B]``.
    """
    out: dict[str, dict[str, Tensor]] = {q: {} for q in QUANTITIES}
    logp_clean = clean.log_softmax(-1).unsqueeze(1)
    idx = target.view(-1, 1, 1)
    for curve, z in points.items():
        at = idx.expand(-1, z.shape[1], 1)
        logp = z.log_softmax(-1)
        out["prob"][curve] = logp.gather(2, at).squeeze(2).exp()
        out["kl"][curve] = kl_divergence(logp_clean, logp)
        out["logit"][curve] = z.gather(2, at).squeeze(2)
        out["correct"][curve] = (z.argmax(-1) == idx.view(-1, 1)).float()
    return out
