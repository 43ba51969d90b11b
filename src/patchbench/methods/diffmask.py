"""Vision DiffMask (Nalmpantis et al., CVPRW 2023): amortised, differentiable patch masking.

One gate per hidden state h0 … h(L+1) reads (h0, h_i) and votes per patch; hard-concrete
gates make the votes differentiable; the masked input ``h0·z + placeholder·(1−z)`` is run
through the frozen model. Training (:mod:`patchbench.methods.diffmask_train`) minimises the
expected L0 norm of the mask subject to KL(p_clean ‖ p_masked) ≤ eps. Inference is one
deterministic pass: the map is the probability that every gate keeps the patch.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from patchbench.methods.base import Method, register_method
from patchbench.models.adapter import ViTAdapter

TEMPERATURE = 0.2
STRETCH = (-0.2, 1.0)


# ---- hard concrete -------------------------------------------------------------------------
def hard_concrete_sample(logits: Tensor, temperature: float = TEMPERATURE,
                         stretch: tuple[float, float] = STRETCH,
                         generator: torch.Generator | None = None) -> Tensor:
    """Reparameterised sample of a stretched, rectified binary-concrete gate in [0, 1].

    Args:
        logits: Location parameters ``[...]``.
        temperature: Concrete temperature.
        stretch: Interval (l, r) the concrete sample is stretched to before clamping.
        generator: Optional generator for the uniform noise.

    Returns:
        Samples ``[...]``; differentiable in ``logits``; exactly 0 or 1 with positive mass.
    """
    # drawn on the CPU (where the generator lives) so a seed gives the same noise on any device
    u = torch.rand(logits.shape, generator=generator).to(logits).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits) / temperature)
    lo, hi = stretch
    return (s * (hi - lo) + lo).clamp(0, 1)


def log_prob_nonzero(logits: Tensor, temperature: float = TEMPERATURE,
                     stretch: tuple[float, float] = STRETCH) -> Tensor:
    """log P(z ≠ 0) of the hard-concrete gate, in closed form.

    z > 0 exactly when the concrete sample exceeds a = −l / (r − l), and
    P(s > a) = sigmoid(logits − T·log(a / (1 − a))) = sigmoid(logits − T·log(−l / r)).
    """
    lo, hi = stretch
    return F.logsigmoid(logits - temperature * math.log(-lo / hi))


# ---- explainer -----------------------------------------------------------------------------
class Gate(nn.Module):
    """g(h0, h) = tanh(W2 tanh(W1 [h0; h])) · mul + add, weight-normalised, one logit per token.

    Args:
        dim: Hidden size D of the model.
        mul: Fixed scale of the output.
        add: Initial value of the learned offset (large: every gate starts open).
    """

    def __init__(self, dim: int, mul: float = 15.0, add: float = 8.0) -> None:
        super().__init__()
        self.f = nn.Sequential(weight_norm(nn.Linear(2 * dim, max(1, dim // 4))), nn.Tanh(),
                               weight_norm(nn.Linear(max(1, dim // 4), 1)), nn.Tanh())
        self.mul = mul
        self.add = nn.Parameter(torch.tensor(float(add)))

    def forward(self, h0: Tensor, h: Tensor) -> Tensor:
        """``[B, P, D]`` x 2 -> gate logits ``[B, P]``."""
        return self.f(torch.cat([h0, h], -1)).squeeze(-1) * self.mul + self.add


class DiffMaskExplainer(nn.Module):
    """The trainable part: L + 2 gates and one placeholder vector.

    Args:
        dim: Hidden size of the explained model.
        num_states: Number of hidden states h0 … h(L+1), i.e. depth + 2.
        mul: Gate output scale. add: initial gate offset.
        placeholder_init: Initial placeholder vector ``[D]`` (e.g. the mean patch embedding).
    """

    def __init__(self, dim: int, num_states: int, mul: float = 15.0, add: float = 8.0,
                 placeholder_init: Tensor | None = None) -> None:
        super().__init__()
        self.gates = nn.ModuleList(Gate(dim, mul, add) for _ in range(num_states))
        init = placeholder_init if placeholder_init is not None else torch.zeros(dim)
        self.placeholder = nn.Parameter(init.detach().clone().float().reshape(dim))

    def gate_logits(self, states: list[Tensor], npt: int, upto: int | None = None) -> Tensor:
        """Logits of gates 0 … ``upto`` (default all), ``[B, P, k + 1]``.

        Args:
            states: Hidden states from :meth:`ViTAdapter.forward_embeddings` (h0 has no
                prefix tokens; the others have ``npt`` prefix tokens, which are skipped).
            npt: Number of prefix tokens of the model.
            upto: Last gate index to evaluate.
        """
        last = len(self.gates) - 1 if upto is None else upto
        h0 = states[0]
        out = [self.gates[0](h0, h0)]
        out += [self.gates[i](h0, states[i][:, npt:]) for i in range(1, last + 1)]
        return torch.stack(out, -1)

    def mask_input(self, h0: Tensor, z: Tensor) -> Tensor:
        """h0·z + placeholder·(1 − z) for per-patch gates ``z`` ``[B, P]``."""
        z = z.unsqueeze(-1)
        return h0 * z + self.placeholder.to(h0.dtype) * (1 - z)


@register_method("diffmask")
class DiffMask(Method):
    """Vision DiffMask: one deterministic pass of a trained explainer.

    The map is log Π_i P(z_i ≠ 0) over all gates (the log of the paper's mask: the same
    order, without saturating to ties at 0 or 1).

    Args:
        checkpoint: Path of a trained explainer (``patchbench train-diffmask``); it must
            have been trained for this model (same key).
    """

    name = "diffmask"
    needs_tokens = True
    trained_for_operator = True
    trained = True

    @classmethod
    def options_from_run(cls, run: Any, options: dict[str, Any]) -> dict[str, Any]:
        """The run's explainer for ``run.operator``'s table: ``checkpoint`` as given, else
        trained (or taken from the cache) for the run's model on the dataset's training
        split against that operator's relaxation (the learned placeholder for an operator
        without one, or with no operator), once per run and operator."""
        from patchbench.methods.diffmask_train import train_for_run, trained_against, untrained_for_run

        against, fresh = trained_against(run.operator), False
        seed = run.seed if run.train_seed is None else run.train_seed
        if options.get("checkpoint") is None:
            # timing only: the cost of a pass does not depend on the gates' weights
            make = untrained_for_run if run.timing_only else train_for_run
            key = f"diffmask:{against.name if against is not None else 'placeholder'}:{seed}"
            path, fresh = run.memo(key, lambda: make(run))
            options["checkpoint"] = str(path)
        record = {"checkpoint": options["checkpoint"], **diffmask_meta(options["checkpoint"]),
                  "trained_in_this_run": fresh}
        name = (run.operator_name or "placeholder") + (f", seed {seed}" if seed != run.seed else "")
        run.meta.setdefault("diffmask", {})[name] = record
        return options

    @classmethod
    def options_for_model(cls, run: Any, options: dict[str, Any], adapter: Any) -> dict[str, Any]:
        """An explainer trained for ``adapter`` (the sanity check's randomised copies, and the
        trained model), against the same removal, for ``run.cfg.sanity_train_steps`` steps:
        reusing the one trained for the original model would fail the check by construction.
        Cached by the model's weights, like every explainer."""
        from patchbench.methods.diffmask_train import train_for_run

        path, _ = train_for_run(dataclasses.replace(run, adapter=adapter), steps=run.cfg.sanity_train_steps)
        return {**options, "checkpoint": str(path)}

    def __init__(self, adapter: ViTAdapter, checkpoint: str | None = None) -> None:
        super().__init__(adapter)
        if checkpoint is None:
            raise ValueError("diffmask needs a trained explainer: pass checkpoint=PATH "
                             "(make one with `patchbench train-diffmask`)")
        self.checkpoint = str(checkpoint)
        self.explainer, self.meta = load_explainer(adapter, checkpoint)

    def setup_seconds(self) -> float | None:
        """The explainer's training time, as measured when it was trained."""
        seconds = self.meta.get("train_seconds")
        return float(seconds) if seconds is not None else None

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        self.explainer.to(images.device)
        _, states = self.adapter.forward_embeddings(self.adapter.patch_embeddings(images), hidden=True)
        logits = self.explainer.gate_logits(states, self.adapter.num_prefix_tokens)
        return log_prob_nonzero(logits).sum(-1).reshape(-1, *self.adapter.grid)


class CheckpointMismatchError(ValueError):
    """A DiffMask checkpoint was trained for another model."""


def load_explainer(adapter: ViTAdapter, path: str | Path) -> tuple[DiffMaskExplainer, dict[str, Any]]:
    """Loads an explainer and checks that it was trained for ``adapter``'s model.

    Raises:
        FileNotFoundError: No file at ``path``.
        CheckpointMismatchError: Trained for a model with another key or shape.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no DiffMask checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "explainer" not in ckpt or "meta" not in ckpt:
        raise CheckpointMismatchError(f"{path} is not a patchbench DiffMask checkpoint "
                                      "(expected keys 'explainer' and 'meta')")
    meta = ckpt["meta"]
    if adapter.key and meta.get("model_key") != adapter.key:
        raise CheckpointMismatchError(
            f"{path} explains model {meta.get('model_key')!r}, not {adapter.key!r}; "
            "train one for this model with `patchbench train-diffmask`")
    dim = adapter.embed_dim
    if meta.get("dim") != dim or meta.get("num_states") != adapter.depth + 2:
        raise CheckpointMismatchError(
            f"{path} has {meta.get('num_states')} gates of width {meta.get('dim')}; the model "
            f"needs {adapter.depth + 2} of width {dim}")
    cfg = meta["config"]
    explainer = DiffMaskExplainer(dim, adapter.depth + 2, cfg["mul"], cfg["add"])
    explainer.load_state_dict(ckpt["explainer"])
    return explainer.eval(), meta


def diffmask_meta(path: str | Path) -> dict[str, Any]:
    """The metadata stored in a DiffMask checkpoint (training time, final KL and L0, config)."""
    return torch.load(path, map_location="cpu", weights_only=True)["meta"]
