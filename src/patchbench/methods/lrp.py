"""Gradient × input with modified backward passes for vision transformers: AttnLRP, plain
LRP-ε and LibraGrad.

Both are computed the way the authors' package ``lxt`` computes them ("efficient" mode):
gradient × input, where forward hooks swap some modules' outputs for tensors of the same value
whose gradient implements an LRP rule. The model's forward pass is its own; the hooks live
only inside :func:`lrp_rules` and are removed on the way out, even after an exception.

AttnLRP (Achtibat et al., ICML 2024) rules, each on the module that carries it:

- **LayerNorm** (any ``nn.LayerNorm``, timm's included): the standard deviation is held
  constant, so relevance passes through the centring and the affine map (the identity rule
  on the normalisation).
- **Element-wise activations** (GELU, ...): the identity rule, gradient ``f(x) / x``.
- **Attention**: the uniform (ε) rule on the two bilinear products, ``Q Kᵀ`` and ``A V``:
  each factor gets half its product's relevance, so the gradient reaching ``q`` and ``k``
  (behind both products) is divided by 4 and the one reaching ``v`` by 2. The softmax needs
  no hook: its ordinary gradient times its input is AttnLRP's softmax rule.
- **Linear layers**: the ε rule (the plain gradient, ε → 0), or the γ rule with ``gamma``
  > 0: weights ``W + γ W⁺`` in the backward pass (and bias ``b + γ b⁺``).

Plain LRP-ε (``lrp``, the control) keeps only the linear layers' rule and passes every
other operation by its gradient, which is gradient × input (Ali et al., ICML 2022, show
that this is LRP with naive rules for attention and LayerNorm).

LibraGrad (Faghihi Mehri et al., CVPR 2025), as its authors' code applies it to a timm ViT
(their ``LX1`` preset, read in NightMachinery/pytorch-image-models-libragrad-v1): the same
LayerNorm and activation rules, no gradient through q and k at all (the attention weights
are held constant; v unscaled), the linear layers untouched, and the probability of the
target class as the output explained; the map is its gradient × input at the tokens
(LibraGrad applied to input × gradient, as in their reference notebook). Their FullGrad+
read-out (bias terms and every block's input) is not implemented here.

Relevance is read at the tokens entering the first block (position embeddings included):
a patch's relevance is Σ_d x_d · ∂logit/∂x_d over its token. With the rules above, the
relevance of all tokens sums to the explained logit up to what the biases absorb.

``lxt`` itself is not used: its 2.1 release imports ``transformers`` names that 5.x removed
(``find_pruneable_heads_and_indices``), it has no map for timm or Hugging Face ViTs, and it
patches layer classes process-wide with no way back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from patchbench.methods.base import Method, register_method
from patchbench.models.adapter import NotAViTError, ViTAdapter

ACTIVATIONS = (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Hardswish)


def with_gradient(value: Tensor, surrogate: Tensor) -> Tensor:
    """A tensor equal to ``value`` whose gradient is that of ``surrogate``."""
    return value.detach() + (surrogate - surrogate.detach())


def _layer_norm_rule(module: nn.LayerNorm, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
    x = inputs[0]
    dims = tuple(range(-len(module.normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    std = (x.var(dims, unbiased=False, keepdim=True) + module.eps).sqrt().detach()
    y = (x - mean) / std
    if module.weight is not None:
        y = y * module.weight
    if module.bias is not None:
        y = y + module.bias
    return with_gradient(out, y)


def _identity_rule(_module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
    x = inputs[0]
    safe = torch.where(x.abs() > 1e-10, x, torch.full_like(x, 1e-10))
    return with_gradient(out, x * (out / safe).detach())


def _gamma_rule(gamma: float):
    def hook(module: nn.Linear, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        weight = module.weight + gamma * module.weight.clamp(min=0)
        bias = None if module.bias is None else module.bias + gamma * module.bias.clamp(min=0)
        z = F.linear(inputs[0], weight, bias)
        stable = z + 1e-6 * torch.where(z >= 0, 1.0, -1.0)
        return with_gradient(out, z * (out / stable).detach())
    return hook


def _scale_gradient(scale: Tensor | float):
    def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        return with_gradient(out, out * scale)
    return hook


# rule set -> (gradient scale of q and k, of v), or None: attention passed by its gradient
ATTENTION_SCALES = {"attnlrp": (0.25, 0.5), "libragrad": (0.0, 1.0), "epsilon": None}


def _attention_hooks(block: nn.Module, qk: float, v: float) -> list[tuple[nn.Module, object]]:
    """(module, hook) pairs that scale the gradient of q and k by ``qk`` and of v by ``v``."""
    attn = getattr(block, "attn", None)
    if attn is not None and isinstance(getattr(attn, "qkv", None), nn.Linear):  # timm: fused q, k, v
        d = attn.qkv.out_features // 3
        scale = torch.cat([torch.full((2 * d,), qk), torch.full((d,), v)])
        return [(attn.qkv, _scale_gradient(scale.to(attn.qkv.weight)))]
    children = {n: m for sub in block.modules() for n, m in sub.named_children()}
    for names in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj")):  # Hugging Face
        if all(isinstance(children.get(n), nn.Linear) for n in names):
            q, k, val = (children[n] for n in names)
            return [(q, _scale_gradient(qk)), (k, _scale_gradient(qk)), (val, _scale_gradient(v))]
    raise NotAViTError(f"{type(block).__name__}: found no q, k, v projections (timm `attn.qkv`, "
                       "or query/key/value, q_proj/k_proj/v_proj)")


@contextlib.contextmanager
def lrp_rules(adapter: ViTAdapter, rules: str = "attnlrp", gamma: float = 0.0) -> Iterator[None]:
    """Installs a rule set on ``adapter``'s model while active (see the module docstring).

    Args:
        adapter: The model.
        rules: ``attnlrp`` (LayerNorm, activation and attention rules), ``libragrad`` (the
            same LayerNorm and activation rules, no gradient through q and k) or ``epsilon``
            (only the linear layers' rule: plain LRP-ε).
        gamma: γ of the linear layers' γ rule; 0: the ε rule.
    """
    if rules not in ATTENTION_SCALES:
        raise ValueError(f"rules must be one of {', '.join(ATTENTION_SCALES)}, got {rules!r}")
    pairs: list[tuple[nn.Module, object]] = []
    if gamma:
        pairs += [(m, _gamma_rule(gamma)) for m in adapter.model.modules() if isinstance(m, nn.Linear)]
    if ATTENTION_SCALES[rules] is not None:
        for m in adapter.model.modules():
            if isinstance(m, nn.LayerNorm):
                pairs.append((m, _layer_norm_rule))
            elif isinstance(m, ACTIVATIONS) or type(m).__module__ == "transformers.activations":
                pairs.append((m, _identity_rule))
        for block in adapter.blocks:
            pairs += _attention_hooks(block, *ATTENTION_SCALES[rules])
    handles = []
    try:
        for module, hook in pairs:  # registration order: γ before the gradient scaling of q, k, v
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def token_relevance(adapter: ViTAdapter, images: Tensor, target: Tensor, rules: str = "attnlrp",
                    gamma: float = 0.0, output: str = "logit") -> tuple[Tensor, Tensor]:
    """Relevance of every token entering the first block, and the explained outputs.

    Args:
        adapter: The model.
        images: Model inputs ``[B, 3, H, W]``.
        target: Class per image ``[B]``.
        rules: The rule set (see :func:`lrp_rules`).
        gamma: γ of the linear layers (0: ε rule).
        output: What is explained: the target's ``logit`` or its softmax ``prob``.

    Returns:
        Relevance ``[B, N]`` (prefix tokens first) and the explained outputs ``[B]``.
    """
    with torch.no_grad():
        tokens = adapter.tokens(images)
    tokens.requires_grad_(True)
    with lrp_rules(adapter, rules, gamma):
        logits = adapter.forward_tokens(tokens)
        scores = logits.softmax(-1) if output == "prob" else logits
        explained = scores.gather(1, target.view(-1, 1)).squeeze(1)
        # images are independent: the gradient of the sum is each image's own gradient
        (grad,) = torch.autograd.grad(explained.sum(), tokens)
    return (tokens * grad).sum(-1).detach(), explained.detach()


@register_method("attnlrp")
class AttnLRP(Method):
    """AttnLRP (Achtibat et al., ICML 2024): LRP with attention rules, at each patch's token.

    The rules for attention, LayerNorm and activations are in :mod:`patchbench.methods.lrp`.

    Args:
        gamma: γ of the linear layers' γ rule; 0 (the default of the authors' ``lxt``,
            whose ViT example sweeps 0-1): the ε rule.
    """

    name = "attnlrp"
    uses_gradients = True
    needs_tokens = True
    rules = "attnlrp"
    output = "logit"

    def __init__(self, adapter: ViTAdapter, gamma: float = 0.0) -> None:
        super().__init__(adapter)
        if gamma < 0:
            raise ValueError(f"gamma must be 0 or more, got {gamma}")
        self.gamma = float(gamma)

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        relevance, _ = token_relevance(self.adapter, images, target, self.rules, self.gamma, self.output)
        return relevance[:, self.adapter.num_prefix_tokens:].reshape(-1, *self.adapter.grid)


@register_method("lrp")
class PlainLRP(AttnLRP):
    """Plain LRP-ε, the control for AttnLRP: gradient × input at each patch's token.

    The ε rule on linear layers and every other operation passed by its gradient: it shows
    what AttnLRP's rules for attention, LayerNorm and activations add.

    Args:
        gamma: γ of the linear layers' γ rule; 0: the ε rule.
    """

    name = "lrp"
    rules = "epsilon"


@register_method("libragrad")
class LibraGrad(AttnLRP):
    """LibraGrad (Faghihi Mehri et al., CVPR 2025) on input × gradient, at each patch's token.

    LayerNorm and activation rules as AttnLRP's, no gradient through the attention weights,
    and the target's probability explained (see :mod:`patchbench.methods.lrp`).

    Args:
        gamma: γ of the linear layers' γ rule; 0 (LibraGrad's): linear layers untouched.
    """

    name = "libragrad"
    rules = "libragrad"
    output = "prob"
