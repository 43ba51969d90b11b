"""Adapters expose what attribution methods and the harness need from a model.

:class:`ImageAdapter` covers any image classifier: a patch grid, normalisation, resizing and
logits. :class:`ViTAdapter` adds what token methods need (patch embeddings, running on a
subset of tokens, hidden states, attention) for a timm ``VisionTransformer``; the Hugging
Face adapter (``models/hf.py``) overrides the few timm-specific primitives.

Everything geometric (patch grid, patch size, prefix tokens) is read from the model, so
register tokens, DeiT's distillation token and non-square grids work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor, nn


class NotAViTError(ValueError):
    """Raised when a model lacks the token structure a ViT adapter needs."""


class ImageAdapter:
    """Any image classifier ``[B, 3, H, W] -> [B, C]`` in evaluation mode, seen on a patch grid.

    Methods that need no tokens (gradients, perturbations, controls) and the pixel removal
    operators work through this interface alone.

    Args:
        model: Module returning logits. It is put in ``eval()`` mode.
        mean: Per-channel normalisation mean of the model's input (pixel values in [0, 1]).
            Defaults to the model's ``pretrained_cfg``.
        std: Per-channel normalisation std, as ``mean``.
        key: An identifier of the weights (ties caches and checkpoints to the model).
        data_config: timm data config (input size, crop_pct, interpolation) used by
            :meth:`prepare` to bring images of another size to the model's.
        img_size: Input size (H, W); default from ``data_config["input_size"]``.
        patch_size: Side of the square cells maps are given on; default the stride of the
            model's last feature map (timm ``feature_info``), e.g. 32 for a ResNet.
    """

    is_vit = False

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        key: str = "",
        data_config: dict | None = None,
        img_size: tuple[int, int] | None = None,
        patch_size: int | None = None,
    ) -> None:
        self._check_model(model)
        self.model = model.eval()
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(mean if mean is not None else cfg.get("mean", (0.5, 0.5, 0.5)))
        self.std = tuple(std if std is not None else cfg.get("std", (0.5, 0.5, 0.5)))
        self.key = key
        self.data_config = data_config or {}
        if not self.is_vit:
            size = img_size or tuple(self.data_config.get("input_size", (3, 224, 224))[-2:])
            stride = patch_size or _feature_stride(model) or 16
            if size[0] % stride or size[1] % stride:
                raise ValueError(f"patch size {stride} does not divide the input size {tuple(size)}")
            self._img_size = (int(size[0]), int(size[1]))
            self._patch = (int(stride), int(stride))

    # ---- geometry -------------------------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int]:
        """Patch size in pixels (ph, pw)."""
        return self._patch

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (Hp, Wp)."""
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def img_size(self) -> tuple[int, int]:
        return self._img_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def cam_layer(self) -> str:
        """Default Grad-CAM target: the module giving the last feature map."""
        info = getattr(self.model, "feature_info", None)
        if info:
            return info[-1]["module"]
        raise ValueError(f"{type(self.model).__name__} has no timm feature_info; give gradcam a layer=")

    def to(self, device: str | torch.device) -> ImageAdapter:
        """Moves the model to ``device`` (returns self)."""
        self.model.to(device)
        return self

    # ---- pixels <-> patches ---------------------------------------------------------------
    def normalize(self, images: Tensor) -> Tensor:
        """Pixel values in [0, 1] ``[B, 3, H, W]`` -> model input."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std

    def pixel_transform(self) -> Callable[[Image.Image], Tensor]:
        """The model's own evaluation transform, without normalisation: a PIL image of any
        size and mode -> pixels ``[3, H, W]`` in [0, 1] at the model's input size.

        It is timm's ``create_transform`` for the model's data config (``crop_pct``,
        ``crop_mode`` including ``squash`` and ``border``, ``interpolation``), so images read
        from disk are resized and cropped exactly as timm evaluates the model; :meth:`prepare`
        then only normalises them.
        """
        from timm.data import create_transform

        cfg = self.data_config
        tf = create_transform(input_size=(3, *self.img_size), is_training=False,
                              interpolation=cfg.get("interpolation", "bicubic"),
                              crop_pct=cfg.get("crop_pct", 1.0), crop_mode=cfg.get("crop_mode"),
                              mean=self.mean, std=self.std, normalize=False)
        # without normalisation timm gives uint8 [3, H, W]; / 255 is ToTensor's scaling
        return lambda image: tf(image.convert("RGB")).float() / 255

    def prepare(self, images: Tensor) -> Tensor:
        """Pixel images in [0, 1] of any size -> model inputs: resized and centre-cropped by
        the model's data config when their size differs from the model's, then normalised.

        Images read from files are better brought to size by :meth:`pixel_transform` as
        they are read (it is exactly timm's, on the decoded image); this tensor path is for
        callers holding tensors already."""
        if tuple(images.shape[-2:]) != self.img_size:
            cfg = self.data_config
            images = resize_for_model(images, self.img_size, cfg.get("crop_pct", 1.0),
                                      cfg.get("interpolation", "bicubic"))
        return self.normalize(images)

    def patch_to_pixel(self, patch_values: Tensor) -> Tensor:
        """Broadcasts per-patch values ``[B, P]`` or ``[B, Hp, Wp]`` to pixels ``[B, 1, H, W]``."""
        grid = patch_values.reshape(-1, 1, *self.grid)
        return grid.repeat_interleave(self.patch_size[0], 2).repeat_interleave(self.patch_size[1], 3)

    def pixel_to_patch(self, pixel_mask: Tensor) -> Tensor:
        """Pools a pixel mask ``[B, H, W]`` to patches ``[B, Hp, Wp]`` (a patch is in if any pixel is)."""
        pooled = F.max_pool2d(pixel_mask.float().unsqueeze(1), self.patch_size)
        return pooled.squeeze(1) > 0

    forward_rows: int | None = None  # set by fixed_rows(): every pass runs exactly this many rows

    @contextmanager
    def fixed_rows(self, rows: int | None) -> Iterator[None]:
        """While active, :meth:`logits` and the token forward passes run in blocks of exactly
        ``rows`` rows (the last block padded), so a row's result does not depend on how many
        rows share its pass: on a CPU the matrix kernels round differently for different
        batch sizes, which moved scores with ``--chunk-size`` and ``--n-images``.

        Args:
            rows: Rows per forward pass, or None for no blocking.
        """
        previous, self.forward_rows = self.forward_rows, rows
        try:
            yield
        finally:
            self.forward_rows = previous

    def logits(self, images: Tensor) -> Tensor:
        """Model output ``[B, C]`` for model inputs ``[B, 3, H, W]``."""
        return in_blocks(self.model, self.forward_rows, images)


    def _check_model(self, model: nn.Module) -> None:
        """Refuses a model this adapter cannot serve (subclasses check their structure)."""


def in_blocks(fn: Callable[..., Tensor], rows: int | None, *tensors: Tensor) -> Tensor:
    """``fn(*tensors)`` computed in blocks of exactly ``rows`` rows; the last block is padded
    with copies of its first row, whose results are dropped. ``rows=None``: one call."""
    n = tensors[0].shape[0]
    if rows is None or n == rows:
        return fn(*tensors)
    out = []
    for start in range(0, n, rows):
        part = [t[start:start + rows] for t in tensors]
        k = part[0].shape[0]
        if k < rows:
            part = [torch.cat([t, t[:1].expand(rows - k, *t.shape[1:])]) for t in part]
        out.append(fn(*part)[:k])
    return torch.cat(out)


def _feature_stride(model: nn.Module) -> int | None:
    info = getattr(model, "feature_info", None)
    try:
        return int(info[-1]["reduction"]) if info else None
    except (KeyError, TypeError, IndexError):
        return None


class ViTAdapter(ImageAdapter):
    """Wraps a timm ``VisionTransformer`` (or subclass): the image interface plus tokens.

    Args:
        model: A timm vision transformer. It is put in ``eval()`` mode.
        mean: Per-channel normalisation mean (default: the model's ``pretrained_cfg``).
        std: Per-channel normalisation std, as ``mean``.
        key: An identifier of the weights.
        data_config: timm data config used by :meth:`prepare`.

    The geometry (``img_size``, ``patch_size``) is read from the model's patch embedding.
    """

    is_vit = True

    def _check_model(self, model: nn.Module) -> None:
        missing = [a for a in ("patch_embed", "blocks", "num_prefix_tokens", "_pos_embed")
                   if not hasattr(model, a)]
        if missing:
            raise NotAViTError(
                f"{type(model).__name__} is not a timm VisionTransformer: it has no "
                f"{', '.join(missing)}; patch-token methods and the 'drop' operator need one."
            )

    # ---- geometry -------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (Hp, Wp)."""
        return tuple(int(g) for g in self.model.patch_embed.grid_size)  # type: ignore[return-value]

    @property
    def patch_size(self) -> tuple[int, int]:
        """Patch size in pixels (ph, pw)."""
        return tuple(int(p) for p in self.model.patch_embed.patch_size)  # type: ignore[return-value]

    @property
    def img_size(self) -> tuple[int, int]:
        return (self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1])

    @property
    def num_prefix_tokens(self) -> int:
        """Class, register and distillation tokens placed before the patch tokens."""
        return int(self.model.num_prefix_tokens)

    @property
    def has_class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    @property
    def _pools_patches(self) -> bool:
        return getattr(self.model, "global_pool", "token") not in ("token", "")

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, in order."""
        return list(self.model.blocks)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def cam_layer(self) -> str:
        """Default Grad-CAM target: the last block's first LayerNorm (its output patch tokens
        reach a class-token head; the last block's own output patch tokens do not)."""
        return f"blocks.{self.depth - 1}.norm1"

    # ---- forward passes -------------------------------------------------------------------
    def patch_embeddings(self, images: Tensor) -> Tensor:
        """h0: patch embeddings before position embeddings and prefix tokens, ``[B, P, D]``."""
        x = self.model.patch_embed(images)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def forward_embeddings(
        self, h0: Tensor, keep_index: Tensor | None = None, hidden: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Runs the model from patch embeddings, optionally on a subset of patch tokens.

        Args:
            h0: Patch embeddings ``[B, P, D]`` (possibly edited, e.g. masked by DiffMask).
            keep_index: ``[B, K]`` indices of the patch tokens to keep; the others are left
                out of the sequence. Kept tokens keep their own position embeddings.
            hidden: Also return the hidden states h0 … h(L+1).

        Returns:
            Logits ``[B, C]``, and with ``hidden`` the list of hidden states: h0 ``[B, P, D]``,
            then the input of every block and the output of the last one ``[B, N, D]``.
        """
        if self.forward_rows is not None and not hidden:
            args = (h0,) if keep_index is None else (h0, keep_index)
            return in_blocks(self._forward_embeddings, self.forward_rows, *args)
        return self._forward_embeddings(h0, keep_index, hidden)

    def _forward_embeddings(
        self, h0: Tensor, keep_index: Tensor | None = None, hidden: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """One forward pass of :meth:`forward_embeddings`, whatever the number of rows."""
        x = self._add_positions(h0)
        if keep_index is not None:
            npt = self.num_prefix_tokens
            patches = x[:, npt:].gather(1, keep_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :npt], patches], dim=1)
        x = self._pre_blocks(x)
        states = [h0]
        for blk in self.blocks:
            states.append(x)
            x = self._run_block(blk, x)
        states.append(x)
        logits = self._head(x)
        return (logits, states) if hidden else logits

    def tokens(self, images: Tensor) -> Tensor:
        """The tokens entering the first block ``[B, N, D]`` (prefix tokens first, position
        embeddings added)."""
        return self._pre_blocks(self._add_positions(self.patch_embeddings(images)))

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Logits ``[B, C]`` from the tokens entering the first block (see :meth:`tokens`)."""
        for blk in self.blocks:
            x = self._run_block(blk, x)
        return self._head(x)

    # The four model-specific primitives (the Hugging Face adapter overrides them).
    def _add_positions(self, h0: Tensor) -> Tensor:
        """Patch embeddings ``[B, P, D]`` -> prefix tokens + position-embedded patches ``[B, N, D]``."""
        x = h0
        if getattr(self.model, "dynamic_img_size", False):  # timm then expects NHWC embeddings
            x = x.reshape(x.shape[0], *self.grid, x.shape[-1])
        return self.model._pos_embed(x)

    def _pre_blocks(self, x: Tensor) -> Tensor:
        return self.model.norm_pre(self.model.patch_drop(x))

    def _run_block(self, block: nn.Module, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        """One block; ``attn_bias`` (broadcast to ``[B, heads, N, N]``) is added to its
        attention logits."""
        return block(x) if attn_bias is None else block(x, attn_mask=attn_bias)

    def _head(self, x: Tensor) -> Tensor:
        """Final tokens ``[B, N, D]`` -> logits ``[B, C]``."""
        return self.model.forward_head(self.model.norm(x))

    def hidden_states(self, images: Tensor) -> list[Tensor]:
        """h0 … h(L+1) for model inputs ``[B, 3, H, W]`` (see :meth:`forward_embeddings`)."""
        return self.forward_embeddings(self.patch_embeddings(images), hidden=True)[1]

    def forward_kept(self, images: Tensor, keep: Tensor) -> Tensor:
        """Logits with the patch tokens where ``keep`` ``[B, P]`` is False left out.

        Rows may keep different numbers of patches; they are run in groups of equal length.
        """
        h0 = self.patch_embeddings(images)
        counts = keep.sum(1)
        out = None
        for count in counts.unique().tolist():
            rows = (counts == count).nonzero().squeeze(1)
            if count == 0 and (self.num_prefix_tokens == 0 or self._pools_patches):
                raise ValueError(
                    "the 'drop' operator cannot remove every patch of a model whose head "
                    f"pools patch tokens (global_pool={getattr(self.model, 'global_pool', None)!r}, "
                    f"{self.num_prefix_tokens} prefix tokens): nothing would be left to pool")
            # stable sort puts kept patches first, in their original order
            index = torch.sort((~keep[rows]).to(torch.int8), dim=1, stable=True).indices[:, :count]
            logits = self.forward_embeddings(h0[rows], keep_index=index)
            if out is None:
                out = logits.new_empty(keep.shape[0], logits.shape[-1])
            out[rows] = logits
        return out

    def forward_soft_kept(self, images: Tensor, z: Tensor, min_weight: float = 1e-20) -> Tensor:
        """Logits with each patch token's weight as an attention key scaled by ``z`` ``[B, P]``
        in [0, 1]: ``log z`` is added to the attention logits of the patch keys in every block.

        For binary ``z`` this equals :meth:`forward_kept` on a model whose head reads the
        prefix tokens (a left-out token reaches them through no attention). ``z`` is clamped
        at ``min_weight`` so that ``log z`` stays finite; the gradient in ``z`` stays bounded
        anyway (a key's attention weight, the bias's gradient, is proportional to ``z``).

        Raises:
            ValueError: The head pools patch tokens (the relaxation would not be exact).
        """
        if self._pools_patches or self.num_prefix_tokens == 0:
            raise ValueError("soft token dropping needs a head that reads a class token; this "
                             f"model pools patch tokens (global_pool={self.model.global_pool!r})")
        bias = z.clamp_min(min_weight).log()
        prefix = bias.new_zeros(bias.shape[0], self.num_prefix_tokens)
        bias = torch.cat([prefix, bias], 1)[:, None, None, :]  # [B, 1, 1, N]: every query, head
        x = self._pre_blocks(self._add_positions(self.patch_embeddings(images)))
        for blk in self.blocks:
            x = self._run_block(blk, x, bias.to(x.dtype))
        return self._head(x)

    # ---- attention ------------------------------------------------------------------------
    @contextmanager
    def record_attention(self) -> Iterator[list[Tensor]]:
        """Records post-softmax attention ``[B, heads, N, N]`` of every block while active.

        timm's fused attention never materialises the probabilities, so it is switched off
        only inside the context; hooks and the fused flag are restored even on exceptions.
        """
        records: list[Tensor] = []
        attns = [blk.attn for blk in self.blocks]
        if not all(hasattr(a, "attn_drop") and hasattr(a, "fused_attn") for a in attns):
            raise NotAViTError(f"{type(self.model).__name__}: attention modules are not timm's")
        fused = [a.fused_attn for a in attns]
        handles = []
        try:
            for a in attns:
                a.fused_attn = False
                handles.append(a.attn_drop.register_forward_hook(
                    lambda _m, inputs, _o: records.append(inputs[0])))
            yield records
        finally:
            for h in handles:
                h.remove()
            for a, f in zip(attns, fused):
                a.fused_attn = f

    def attention(self, images: Tensor) -> list[Tensor]:
        """Post-softmax attention of every block, ``L`` tensors ``[B, heads, N, N]``."""
        with self.record_attention() as records:
            self.logits(images)
        return list(records)


def resize_for_model(images: Tensor, size: tuple[int, int], crop_pct: float = 1.0,
                     interpolation: str = "bicubic") -> Tensor:
    """Resize (shorter side to ``size / crop_pct``) and centre-crop pixel images ``[B, 3, h, w]``
    to ``size``, as timm's evaluation transform does."""
    h, w = size
    scale = math.floor(max(h, w) / crop_pct)
    mode = {"bicubic": TF.InterpolationMode.BICUBIC, "bilinear": TF.InterpolationMode.BILINEAR,
            "nearest": TF.InterpolationMode.NEAREST}.get(interpolation, TF.InterpolationMode.BICUBIC)
    out = TF.resize(images, scale, interpolation=mode, antialias=True)
    return TF.center_crop(out, [h, w]).clamp(0, 1)

