"""The model's weights are the benchmark's ground: a method that edits them is caught.

A method (a plugin above all) that changes a parameter or buffer in ``attribute()`` would
make every later method score on another model, and its stored results would pass for the
trained model's. :class:`WeightGuard` keeps a digest and a CPU copy of the weights, checks the
digest after each piece of method code has run, and puts the weights back when they changed.
"""

from __future__ import annotations

import torch
from torch import nn

from patchbench.errors import ModelChangedError, WeightsLostError
from patchbench.utils import weights_digest

__all__ = ["ModelChangedError", "WeightGuard", "WeightsLostError"]


class WeightGuard:
    """Digest and copy of a model's parameters and buffers, taken once.

    Args:
        model: The model every method is scored on.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.digest = weights_digest(model)
        self._saved = {name: t.detach().to("cpu", copy=True) for name, t in self._tensors().items()}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return dict([*self.model.named_parameters(), *self.model.named_buffers()])

    def check(self, who: str) -> None:
        """Raises :class:`ModelChangedError` if the weights differ from the saved ones,
        after restoring them, so that the next method scores the trained model again."""
        now = weights_digest(self.model)
        if now == self.digest:
            return
        self.restore()
        raise ModelChangedError(f"{who} changed the model's weights (digest {self.digest[:12]} -> "
                                f"{now[:12]}); they were restored and none of its results were kept")

    @torch.no_grad()
    def restore(self) -> None:
        tensors = self._tensors()
        if tensors.keys() != self._saved.keys():
            raise WeightsLostError("a method added or removed model parameters or buffers; the model "
                                    "cannot be restored, so the run stops here")
        for name, t in tensors.items():
            t.copy_(self._saved[name])
        if weights_digest(self.model) != self.digest:
            raise WeightsLostError("the model's weights could not be restored; the run stops here")
