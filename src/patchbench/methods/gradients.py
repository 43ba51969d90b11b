"""Gradient methods: Grad-CAM (pytorch-grad-cam), integrated gradients (captum) and SmoothGrad."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from patchbench.methods.base import Method, register_method
from patchbench.models.adapter import ImageAdapter
from patchbench.models.removal import hash_seed


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


def _content_seed(image: Tensor, seed: int) -> int:
    """A seed from ``seed`` and the image's bytes: the same image gets it in any batch."""
    digest = hashlib.sha256(image.detach().float().cpu().numpy().tobytes()).digest()
    return hash_seed(seed, int.from_bytes(digest[:7], "little"))


@register_method("smoothgrad")
class SmoothGradMethod(Method):
    """SmoothGrad (Smilkov et al., 2017): input gradients averaged over noisy copies, per patch.

    The gradient of the target logit is taken at ``n_samples`` copies of the image with
    Gaussian noise of std ``noise`` × (max − min of the image) added in model-input space,
    times the noisy copy itself if ``times_input`` (SmoothGrad applied to gradient × input).
    The mean over copies is summed over channels, made absolute if ``absolute``, and summed
    per patch, as integrated gradients' maps are.

    The noise of copy ``s`` of an image is seeded from ``seed``, ``s`` and a hash of the
    image's content (as the ``random`` control is), so an image gets the same noise in any
    batch, at any position and in any chunk. captum's ``NoiseTunnel`` is not used for that
    reason: it draws the noise of a whole batch from the global generator.

    Args:
        adapter: The model (any image classifier).
        n_samples: Noisy copies per image.
        noise: Noise std as a fraction of the image's value range (max − min), >= 0.
        absolute: Pool |value| (what SmoothGrad visualises) instead of the signed value.
        times_input: Multiply each copy's gradient by that copy (gradient × input).
        seed: Mixed into every copy's noise seed.
        batch_size: Noisy copies per forward/backward pass.
    """

    name = "smoothgrad"
    uses_gradients = True

    def __init__(self, adapter: ImageAdapter, n_samples: int = 16, noise: float = 0.15,
                 absolute: bool = True, times_input: bool = False, seed: int = 0,
                 batch_size: int = 256) -> None:
        super().__init__(adapter)
        for option, value in (("n_samples", n_samples), ("batch_size", batch_size)):
            # bool is an int subclass: n_samples=True would silently mean 1
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{option} must be an integer >= 1, got {value!r}")
        if not noise >= 0:  # also refuses NaN
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.n_samples = n_samples
        self.noise = noise
        self.absolute = absolute
        self.times_input = times_input
        self.seed = seed
        self.batch_size = batch_size

    def _draw(self, image_seed: int, sample: int, like: Tensor) -> Tensor:
        # one generator per copy: the draw cannot depend on how copies are split into chunks;
        # drawn on the CPU so a seed gives the same noise on any device
        g = torch.Generator().manual_seed(hash_seed(image_seed, sample))
        return torch.randn(like.shape, generator=g).to(like)

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        b, n = images.shape[0], self.n_samples
        seeds = [_content_seed(image, self.seed) for image in images]
        std = self.noise * (images.amax((1, 2, 3)) - images.amin((1, 2, 3)))  # [B]
        total = torch.zeros(b, 1, *images.shape[2:], device=images.device, dtype=images.dtype)
        for start in range(0, b * n, self.batch_size):
            flat = range(start, min(start + self.batch_size, b * n))
            owner = torch.tensor([k // n for k in flat], device=images.device)
            draws = torch.stack([self._draw(seeds[k // n], k % n, images[0]) for k in flat])
            noisy = (images[owner] + std[owner].view(-1, 1, 1, 1) * draws).detach().requires_grad_(True)
            logits = self.adapter.logits(noisy)
            # copies are independent, so the gradient of the summed logits is each copy's own
            # gradient; autograd.grad leaves no .grad on the parameters
            (grad,) = torch.autograd.grad(logits.gather(1, target[owner].view(-1, 1)).sum(), noisy)
            sensitivity = grad * noisy.detach() if self.times_input else grad
            total.index_add_(0, owner, sensitivity.sum(1, keepdim=True))
        attr = total / n
        if self.absolute:
            attr = attr.abs()
        ph, pw = self.adapter.patch_size
        return (F.avg_pool2d(attr, (ph, pw)) * (ph * pw)).squeeze(1)
