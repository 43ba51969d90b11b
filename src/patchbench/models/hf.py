"""Hugging Face ``ViTForImageClassification`` behind the ViT adapter (``pip install patchbench[hf]``).

The paper's checkpoints (e.g. ``google/vit-base-patch16-224``) are HF models. The adapter
overrides only the token primitives of :class:`ViTAdapter` (patch embeddings, positions,
blocks, head, attention), so every method and operator works on them unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from patchbench.models.adapter import NotAViTError, ViTAdapter

PREFIX = "hf:"


class HFLogits(nn.Module):
    """``ViTForImageClassification`` as a module returning plain logits (captum and
    pytorch-grad-cam call ``model(images)`` and expect a tensor)."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model
        self.num_classes = int(hf_model.config.num_labels)

    def forward(self, images: Tensor) -> Tensor:
        return self.hf(pixel_values=images).logits


class HFViTAdapter(ViTAdapter):
    """Adapter for a transformers ``ViTForImageClassification`` (class token, no registers).

    Args:
        hf_model: The HF model.
        mean: Normalisation mean (the image processor's ``image_mean``).
        std: Normalisation std (``image_std``).
        key: Identifier of the weights.
        data_config: ``input_size``, ``crop_pct`` (1: HF's ViT processor resizes, no crop)
            and ``interpolation``.
    """

    processor: Any = None  # the model's image processor, when it has one

    def __init__(self, hf_model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 key: str = "", data_config: dict | None = None) -> None:
        super().__init__(HFLogits(hf_model), mean, std, key, data_config)

    def pixel_transform(self) -> Callable[[Any], Tensor]:
        """The model's image processor without its normalisation (resize, rescale to [0, 1]);
        timm's squash resize to the model's size where the model has no processor."""
        if self.processor is None:
            return super().pixel_transform()
        proc = self.processor
        return lambda image: proc(images=image.convert("RGB"), do_normalize=False,
                                  return_tensors="pt")["pixel_values"][0].float()

    def _check_model(self, model: nn.Module) -> None:
        if not hasattr(model.hf, "vit") or not hasattr(model.hf, "classifier"):
            raise NotAViTError(f"{type(model.hf).__name__} is not a ViTForImageClassification")

    @property
    def _vit(self) -> nn.Module:
        return self.model.hf.vit

    @property
    def grid(self) -> tuple[int, int]:
        size, patch = self._vit.config.image_size, self._vit.config.patch_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return (size[0] // patch[0], size[1] // patch[1])

    @property
    def patch_size(self) -> tuple[int, int]:
        p = self._vit.config.patch_size
        return (p, p) if isinstance(p, int) else tuple(p)

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def has_class_token(self) -> bool:
        return True

    @property
    def _pools_patches(self) -> bool:
        return False

    @property
    def embed_dim(self) -> int:
        return int(self._vit.config.hidden_size)

    @property
    def blocks(self) -> list[nn.Module]:
        # transformers 5 keeps the layers on the model; 4.x under ``encoder.layer``
        layers = getattr(self._vit, "layers", None)
        return list(layers if layers is not None else self._vit.encoder.layer)

    @property
    def cam_layer(self) -> str:
        prefix = "hf.vit.layers" if hasattr(self._vit, "layers") else "hf.vit.encoder.layer"
        return f"{prefix}.{self.depth - 1}.layernorm_before"

    def patch_embeddings(self, images: Tensor) -> Tensor:
        return self._vit.embeddings.patch_embeddings(images)

    def _add_positions(self, h0: Tensor) -> Tensor:
        emb = self._vit.embeddings
        cls = emb.cls_token.expand(h0.shape[0], -1, -1)
        return torch.cat([cls, h0], dim=1) + emb.position_embeddings

    def _pre_blocks(self, x: Tensor) -> Tensor:
        return self._vit.embeddings.dropout(x)

    def _run_block(self, block: nn.Module, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        if attn_bias is not None:
            raise NotImplementedError("an attention bias (soft token dropping) needs a timm ViT; "
                                      "Hugging Face ViT layers take no attention mask")
        out = block(x)
        return out[0] if isinstance(out, tuple) else out  # 4.x returns a tuple

    def _head(self, x: Tensor) -> Tensor:
        return self.model.hf.classifier(self._vit.layernorm(x)[:, 0])

    @contextmanager
    def record_attention(self) -> Iterator[list[Tensor]]:
        """Records post-softmax attention ``[B, heads, N, N]`` of every layer while active.

        SDPA never materialises the probabilities, so the eager implementation is selected
        only inside the context and the attention modules' second output is recorded.
        """
        records: list[Tensor] = []
        config = self.model.hf.config
        before = getattr(config, "_attn_implementation", None)
        handles = []

        def grab(_m: nn.Module, _inputs: Any, output: Any) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(weights, torch.Tensor):
                raise RuntimeError("HF attention returned no weights; is the eager implementation on?")
            records.append(weights)

        try:
            config._attn_implementation = "eager"
            for blk in self.blocks:
                handles.append(blk.attention.register_forward_hook(grab))
            yield records
        finally:
            for h in handles:
                h.remove()
            config._attn_implementation = before


def create_hf_model(name: str) -> tuple[HFViTAdapter, dict[str, Any]]:
    """A ``ViTForImageClassification`` from the hub (or its cache) or a ``save_pretrained`` folder.

    Args:
        name: ``hf:<hub id or folder>``, e.g. ``hf:google/vit-base-patch16-224``.

    Returns:
        The adapter and metadata (key, data config).
    """
    source = name.removeprefix(PREFIX)
    try:
        from transformers import ViTForImageClassification
    except ImportError:
        raise ImportError(f"{name} needs Hugging Face transformers: pip install 'patchbench[hf]'") from None
    if Path(source).exists() and not (Path(source) / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a save_pretrained folder: expected config.json and "
                                "model.safetensors (or pytorch_model.bin) in it")
    model = ViTForImageClassification.from_pretrained(source)
    processor, (mean, std, size, interpolation) = _processor_config(source, model.config)
    data_config = {"input_size": (3, *size), "crop_pct": 1.0, "crop_mode": "squash",
                   "interpolation": interpolation, "mean": mean, "std": std}
    adapter = HFViTAdapter(model, mean, std, key=_key(source), data_config=data_config)
    adapter.processor = processor
    if tuple(size) != adapter.img_size:
        raise ValueError(f"{source}: the image processor resizes to {tuple(size)} but the model "
                         f"takes {adapter.img_size}")
    return adapter, {"key": adapter.key, "arch": name, "pretrained": True, "checkpoint": source,
                     "data_config": data_config}


def _processor_config(source: str, config: Any) -> tuple[Any, tuple[tuple, tuple, tuple[int, int], str]]:
    """The model's image processor (or None) and its mean, std, size and interpolation, or
    ViT's defaults (mean = std = 0.5, bilinear resize to the model's size) without one."""
    size = config.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    mean, std, interpolation = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear"
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        return None, (mean, std, size, interpolation)
    mean = tuple(getattr(proc, "image_mean", None) or mean)
    std = tuple(getattr(proc, "image_std", None) or std)
    s = getattr(proc, "size", None) or {}
    if "height" in s and "width" in s:
        size = (int(s["height"]), int(s["width"]))
    resample = getattr(proc, "resample", None)
    interpolation = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(int(resample), "bilinear") \
        if resample is not None else interpolation
    return proc, (mean, std, size, interpolation)


def _key(source: str) -> str:
    """Hub ids are their own key; a local folder is keyed by its config and weights."""
    path = Path(source)
    if not path.is_dir():
        return f"hf-{source.replace('/', '--')}"
    digest = hashlib.sha256()
    for f in sorted(path.glob("*.json")) + sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return f"hf-{path.name}-{digest.hexdigest()[:12]}"
