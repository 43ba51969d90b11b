"""Attention-based methods: raw last-layer attention, attention rollout and Chefer et al.'s
gradient-weighted rollout."""

from __future__ import annotations

import torch
from torch import Tensor

from patchbench.methods.base import Method, register_method
from patchbench.models.adapter import ViTAdapter

FUSIONS = ("mean", "max", "min")


def _fuse(attn: Tensor, how: str) -> Tensor:
    """[B, heads, N, N] -> [B, N, N]."""
    if how == "mean":
        return attn.mean(1)
    return attn.amax(1) if how == "max" else attn.amin(1)


def _patch_relevance(adapter: ViTAdapter, rows: Tensor) -> Tensor:
    """Relevance of patch tokens from token-to-token scores ``[B, N, N]``.

    Read from the class token's row; a model without one (global pooling) uses the mean of
    the rows of all patch tokens.
    """
    npt = adapter.num_prefix_tokens
    query = rows[:, 0] if adapter.has_class_token else rows[:, npt:].mean(1)
    return query[:, npt:].reshape(-1, *adapter.grid)


@register_method("attention")
class LastLayerAttention(Method):
    """Class-token attention to each patch in the last block.

    Args:
        head_fusion: How heads are combined: mean, max or min.
    """

    name = "attention"
    needs_tokens = True

    def __init__(self, adapter: ViTAdapter, head_fusion: str = "mean") -> None:
        super().__init__(adapter)
        if head_fusion not in FUSIONS:
            raise ValueError(f"head_fusion must be one of {FUSIONS}, got {head_fusion!r}")
        self.head_fusion = head_fusion

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        return _patch_relevance(self.adapter, _fuse(self.adapter.attention(images)[-1], self.head_fusion))


@register_method("rollout")
class AttentionRollout(Method):
    """Attention rollout (Abnar & Zuidema, 2020), computed independently for every image.

    Each block's head-fused attention, with the weakest ``discard_ratio`` of its entries
    zeroed (per image; the class token's self-attention is never discarded), is averaged
    with the identity for the residual path, row-normalised, and the blocks are multiplied.

    Args:
        head_fusion: mean, max or min over heads.
        discard_ratio: Fraction of the lowest attention entries set to zero, in [0, 1).
    """

    name = "rollout"
    needs_tokens = True

    def __init__(self, adapter: ViTAdapter, head_fusion: str = "mean",
                 discard_ratio: float = 0.0) -> None:
        super().__init__(adapter)
        if head_fusion not in FUSIONS:
            raise ValueError(f"head_fusion must be one of {FUSIONS}, got {head_fusion!r}")
        if not 0 <= discard_ratio < 1:
            raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
        self.head_fusion = head_fusion
        self.discard_ratio = discard_ratio

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        attns = self.adapter.attention(images)
        b, _, n, _ = attns[0].shape
        eye = torch.eye(n, device=images.device).expand(b, n, n)
        rollout = eye
        for attn in attns:
            a = _fuse(attn, self.head_fusion)
            k = int(n * n * self.discard_ratio)
            if k:
                flat = a.reshape(b, -1).clone()
                lowest = flat.topk(k, dim=1, largest=False).indices
                drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True)
                drop[:, 0] = False  # class token -> class token
                a = flat.masked_fill(drop, 0).view(b, n, n)
            a = (a + eye) / 2
            a = a / a.sum(-1, keepdim=True)
            rollout = a @ rollout
        return _patch_relevance(self.adapter, rollout)


@register_method("chefer")
class CheferRelevance(Method):
    """Gradient-weighted attention rollout (Chefer, Gur & Wolf, 2021).

    Every block's post-softmax attention ``A`` is weighted by the gradient of the target
    logit with respect to it: ``Ā = mean over heads of ReLU(∇A ⊙ A)``. Starting from the
    identity, ``R = R + Ā·R`` block by block; the class token's row of ``R`` over the patch
    tokens is the map (the mean patch row for models without a class token). Unlike plain
    rollout it depends on the target class, and attention whose change would not raise the
    target logit adds nothing. The method has no options.
    """

    name = "chefer"
    uses_gradients = True
    needs_tokens = True

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        # inputs that require grad keep the attention in the graph even if the model's
        # parameters are frozen
        images = images.detach().requires_grad_(True)
        with self.adapter.record_attention() as records:
            logits = self.adapter.logits(images)
        attns = list(records)
        if len(attns) != len(self.adapter.blocks):
            raise RuntimeError(f"chefer: recorded {len(attns)} attention maps for "
                               f"{len(self.adapter.blocks)} blocks")
        # the images of the batch are independent, so the gradient of the summed logits gives
        # each image's own gradients in one backward pass; autograd.grad (not backward) leaves
        # no .grad on the parameters
        selected = logits.gather(1, target.view(-1, 1)).sum()
        grads = torch.autograd.grad(selected, attns)
        b, _, n, _ = attns[0].shape
        relevance = torch.eye(n, device=images.device, dtype=attns[0].dtype).expand(b, n, n)
        for attn, grad in zip(attns, grads):
            weighted = (grad * attn).clamp(min=0).mean(1).detach()
            relevance = relevance + weighted @ relevance
        return _patch_relevance(self.adapter, relevance)
