"""The metric math, once, as pure functions over tensors."""

from __future__ import annotations

import torch
from torch import Tensor

CURVES = ("deletion", "insertion", "lerf")


def patch_ranking(maps: Tensor) -> Tensor:
    """Rank of every patch in the relevance order: 0 = most relevant.

    Args:
        maps: Relevance ``[B, P]`` (or ``[B, Hp, Wp]``, flattened row-major).

    Returns:
        ``[B, P]`` int64. Ties are broken by patch index (lower index ranks first), so every
        method is ordered at the same patch granularity and the order is deterministic.
    """
    flat = maps.flatten(1)
    order = torch.sort(-flat, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return rank.scatter_(1, order, positions)


def step_counts(num_patches: int, steps: int | None = None) -> Tensor:
    """Numbers of patches removed (or inserted) at each point of a curve.

    ``steps + 1`` points from 0 to ``num_patches``, both ends included, spaced as evenly as
    integers allow and symmetric (``c[S - j] = P - c[j]``), so the LeRF curve reuses the
    insertion curve's forward passes exactly. ``steps=None`` means one patch per step. An
    even number of steps over an odd number of patches has no integer midpoint, so one
    step is added there.

    Returns:
        ``[S + 1]`` int64, strictly increasing.
    """
    p = num_patches
    s = p if steps is None else min(int(steps), p)
    if s < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if s % 2 == 0 and p % 2 == 1:
        s += 1
    half = torch.tensor([round(j * p / s) for j in range(s // 2 + 1)], dtype=torch.int64)
    tail = p - half.flip(0)
    counts = torch.cat([half, tail[1:] if s % 2 == 0 else tail])
    return counts


def keep_masks(rank: Tensor, counts: Tensor, curve: str) -> Tensor:
    """Which patches are kept at every point of a curve.

    Args:
        rank: ``[B, P]`` from :func:`patch_ranking`.
        counts: ``[S + 1]`` from :func:`step_counts`.
        curve: ``deletion`` (most relevant removed first), ``insertion`` (from everything
            removed, most relevant put back first) or ``lerf`` (least relevant removed first).

    Returns:
        ``[B, S + 1, P]`` bool, True = kept.
    """
    r = rank.unsqueeze(1)
    c = counts.to(rank.device).view(1, -1, 1)
    if curve == "deletion":
        return r >= c
    if curve == "insertion":
        return r < c
    if curve == "lerf":
        return r < rank.shape[1] - c
    raise ValueError(f"unknown curve {curve!r}; valid curves: {', '.join(CURVES)}")


def kl_divergence(logp_clean: Tensor, logp: Tensor) -> Tensor:
    """KL(p_clean ‖ p) over the last dimension, from log-probabilities ``[..., C]``."""
    return (logp_clean.exp() * (logp_clean - logp)).sum(-1).clamp_min(0)


def auc(x: Tensor, y: Tensor, upto: float | None = None) -> Tensor:
    """Area under ``y [..., S + 1]`` over ``x [S + 1]`` (increasing) by the trapezoid rule.

    Args:
        upto: Integrate over ``[x[0], upto]`` only; ``y`` is interpolated linearly at
            ``upto`` when it falls between two points.
    """
    x = x.to(y)
    if upto is not None and upto < float(x[-1]):
        j = int((x <= upto + 1e-9).sum())  # points inside; x[j] is the first beyond
        t = (upto - x[j - 1]) / (x[j] - x[j - 1])
        end = y[..., j - 1] + t * (y[..., j] - y[..., j - 1])
        x = torch.cat([x[:j], x.new_tensor([upto])])
        y = torch.cat([y[..., :j], end.unsqueeze(-1)], -1)
    return torch.trapezoid(y, x, dim=-1)


def patch_auroc(maps: Tensor, truth: Tensor) -> Tensor:
    """Per-image AUROC of patch relevance against a ground-truth patch mask.

    The probability that a random ground-truth patch scores higher than a random other
    patch, ties counting one half (Mann-Whitney U / (n_pos n_neg)).

    Args:
        maps: ``[B, P]`` or ``[B, Hp, Wp]`` relevance.
        truth: Same shape, bool.

    Returns:
        ``[B]`` float; NaN for an image whose mask is empty or full.
    """
    s = maps.flatten(1).float()
    t = truth.flatten(1).bool()
    diff = s.unsqueeze(2) - s.unsqueeze(1)  # [B, P, P]: score_i - score_j
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()
    pairs = (t.unsqueeze(2) & ~t.unsqueeze(1)).float()
    n_pairs = pairs.sum((1, 2))
    return (wins * pairs).sum((1, 2)) / n_pairs.where(n_pairs > 0, torch.nan)


def pointing_game(maps: Tensor, truth: Tensor) -> Tensor:
    """Per-image hit: is the most relevant patch inside the ground truth?

    The most relevant patch is the first in :func:`patch_ranking`'s order (ties go to the
    lower patch index), the same patch the deletion curve removes first.

    Args:
        maps: ``[B, P]`` or ``[B, Hp, Wp]`` relevance.
        truth: Same shape, bool.

    Returns:
        ``[B]`` float, 1.0 for a hit and 0.0 for a miss; NaN where the mask is empty.
    """
    t = truth.flatten(1).bool()
    top = patch_ranking(maps).argmin(1)
    hit = t.gather(1, top.view(-1, 1)).squeeze(1).float()
    return hit.where(t.any(1), torch.nan)


def relevance_mass(maps: Tensor, truth: Tensor) -> Tensor:
    """Per-image share of the relevance that falls inside the ground truth.

    Maps are shifted so each image's least relevant patch has 0: the harness uses only a
    map's order, so its offset (e.g. DiffMask's log-probabilities, all negative) must not
    decide the score.

    Args:
        maps: ``[B, P]`` or ``[B, Hp, Wp]`` relevance.
        truth: Same shape, bool.

    Returns:
        ``[B]`` float in [0, 1]; NaN where the mask is empty or the map is constant.
    """
    s = maps.flatten(1).float()
    s = s - s.min(1, keepdim=True).values
    t = truth.flatten(1).bool()
    total = s.sum(1)
    share = (s * t).sum(1) / total.where(total > 0, torch.nan)
    return share.where(t.any(1), torch.nan)
