"""Any timm model by name (random weights, pretrained the timm way, or a local checkpoint),
and the ``hf:`` prefix for Hugging Face ViTs."""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from patchbench.models.adapter import ImageAdapter, ViTAdapter
from patchbench.models.hf import PREFIX, create_hf_model
from patchbench.registry import UnknownNameError


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Weights from a ``.safetensors`` or ``.pth``/``.pt`` file (a bare state dict, or one
    under ``state_dict``, ``model`` or ``state_dict_ema``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError, or OSError/ValueError on a truncated header
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or "
                                  f"damaged?): {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(model: nn.Module, path: str | Path, state: dict[str, Tensor] | None = None) -> None:
    """Loads weights strictly; on a mismatch says which keys and shapes disagree.

    Args:
        model: The model to load into.
        path: The checkpoint file (named in errors).
        state: Its state dict if already read.
    """
    state = read_state_dict(path) if state is None else state
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({'; '.join(shapes[:3])})")
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state)


def create_timm_model(name: str, pretrained: bool = False, checkpoint: str | Path | None = None,
                      num_classes: int | None = None) -> tuple[ImageAdapter, dict[str, Any]]:
    """A timm model wrapped in an adapter, with its own data config: a :class:`ViTAdapter`
    for vision transformers, an :class:`ImageAdapter` (no token methods) for anything else.

    Args:
        name: Any timm model name (``timm.list_models()``).
        pretrained: Load timm's pretrained weights (hub or local cache).
        checkpoint: A local ``.safetensors`` / ``.pth`` file loaded on top, strictly.
        num_classes: Classifier size; by default timm's, or the checkpoint's when it has one.

    Returns:
        The adapter and metadata (key, data config).
    """
    import timm
    from timm.data import resolve_data_config

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(f"unknown model {name!r}: neither an embedded model (pb-vit-tiny) "
                               f"nor a timm model.{hint} See timm.list_models().")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    key = f"{name}{'-pretrained' if pretrained else '-random'}"
    if checkpoint is not None:
        head = f"{getattr(model, 'pretrained_cfg', {}).get('classifier', 'head')}.weight"
        state = read_state_dict(checkpoint)
        state_head = state.get(head)
        if num_classes is None and state_head is not None and state_head.shape[0] != model.num_classes:
            model.reset_classifier(state_head.shape[0])  # the classifier size comes from the file
        load_checkpoint(model, checkpoint, state)
        key = f"{name}-{hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:12]}"
    elif not pretrained:
        key += "-untrained"
    cfg = resolve_data_config(model=model)
    is_vit = all(hasattr(model, a) for a in ("patch_embed", "blocks", "num_prefix_tokens", "_pos_embed"))
    cls = ViTAdapter if is_vit else ImageAdapter
    adapter = cls(model.eval(), cfg["mean"], cfg["std"], key=key, data_config=cfg)
    return adapter, {"key": key, "arch": name, "pretrained": pretrained, "vit": is_vit,
                     "checkpoint": str(checkpoint) if checkpoint else None, "data_config": cfg}


def create_model(name: str, pretrained: bool = False, checkpoint: str | Path | None = None,
                 num_classes: int | None = None) -> tuple[ImageAdapter, dict[str, Any]]:
    """A model by name: ``hf:<hub id or folder>`` for Hugging Face ViTs, else a timm name
    (see :func:`create_timm_model`)."""

    if name.startswith(PREFIX):
        if checkpoint is not None or num_classes is not None:
            raise ValueError("hf: models load their weights and classes from the hub id or folder; "
                             "--checkpoint does not apply")
        return create_hf_model(name)
    return create_timm_model(name, pretrained, checkpoint, num_classes)
