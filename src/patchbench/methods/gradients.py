"""Gradient methods: Grad-CAM (pytorch-grad-cam) and integrated gradients (captum)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from patchbench.methods.base import Method, register_method
from patchbench.models.adapter import ImageAdapter


@register_method("gradcam")
class GradCAMMethod(Method):
    """Grad-CAM through pytorch-grad-cam, on patch tokens (ViTs) or the last feature map.

    On a ViT the target layer defaults to the last block's first LayerNorm: the last block's
    *output* patch tokens reach a class-token head through nothing, so their gradients are
    zero. On other timm models it is the module of the last feature map (``feature_info``).
    Maps are ReLU'd and min-max scaled per image as pytorch-grad-cam does (no eigen-smooth:
    its sign is arbitrary).

    Args:
        layer: Dotted path of the target module inside the model.
    """

    name = "gradcam"
    uses_gradients = True

    def __init__(self, adapter: ImageAdapter, layer: str | None = None) -> None:
        super().__init__(adapter)
        self.layer = layer or adapter.cam_layer
        self.module = adapter.model.get_submodule(self.layer)

    def _reshape(self, tokens: Tensor) -> Tensor:
        patches = tokens[:, self.adapter.num_prefix_tokens:]
        return patches.reshape(patches.shape[0], *self.adapter.grid, -1).permute(0, 3, 1, 2)

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        # imported here: pytorch-grad-cam pulls in scikit-learn and OpenCV (seconds of start-up)
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        grid = self.adapter.grid

        class PatchGradCAM(GradCAM):  # keeps the patch grid instead of upsampling to pixels
            def get_target_width_height(self, input_tensor: Tensor) -> tuple[int, int]:
                return grid[1], grid[0]

        reshape = self._reshape if self.adapter.is_vit else None  # CNN maps are [B, C, h, w]
        cam = PatchGradCAM(self.adapter.model, [self.module], reshape_transform=reshape)
        # not `with cam:`, whose __exit__ swallows IndexError; release hooks ourselves
        try:
            maps = cam(images, targets=[ClassifierOutputTarget(int(t)) for t in target])
            grads = cam.activations_and_grads.gradients
            if all(float(np.abs(g.cpu().numpy()).max()) == 0 for g in grads):
                raise RuntimeError(f"gradcam: gradients at {self.layer!r} are all zero; choose a "
                                   "layer whose output reaches the logits (e.g. blocks.-1.norm1)")
        finally:
            cam.activations_and_grads.release()
            self.adapter.model.zero_grad(set_to_none=True)
        return torch.from_numpy(np.asarray(maps)).to(images.device)


@register_method("integrated_gradients")
class IntegratedGradientsMethod(Method):
    """Integrated gradients (captum) from a baseline image, pixel attributions summed per patch.

    Args:
        n_steps: Riemann/Gauss-Legendre steps of the path integral.
        baseline: ``zero`` (the model's normalisation mean colour) or ``black``.
        absolute: Pool |attribution| instead of the signed attribution.
        internal_batch_size: Path points evaluated per forward pass.
    """

    name = "integrated_gradients"
    uses_gradients = True

    def __init__(self, adapter: ImageAdapter, n_steps: int = 32, baseline: str = "zero",
                 absolute: bool = False, internal_batch_size: int = 512) -> None:
        super().__init__(adapter)
        if baseline not in ("zero", "black"):
            raise ValueError(f"baseline must be 'zero' or 'black', got {baseline!r}")
        self.n_steps = n_steps
        self.baseline = baseline
        self.absolute = absolute
        self.internal_batch_size = internal_batch_size

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        if self.baseline == "zero":
            base = torch.zeros_like(images)
        else:
            base = self.adapter.normalize(torch.zeros_like(images))
        from captum.attr import IntegratedGradients  # imported here: slow to import

        ig = IntegratedGradients(self.adapter.model)
        attr = ig.attribute(images, baselines=base, target=target, n_steps=self.n_steps,
                            internal_batch_size=self.internal_batch_size)
        attr = attr.sum(1, keepdim=True)
        if self.absolute:
            attr = attr.abs()
        ph, pw = self.adapter.patch_size
        pooled = F.avg_pool2d(attr, (ph, pw)) * (ph * pw)
        self.adapter.model.zero_grad(set_to_none=True)
        return pooled.squeeze(1).detach()
