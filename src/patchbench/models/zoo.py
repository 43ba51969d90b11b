"""Embedded default models: small timm ViTs that patchbench trains itself, cached by key.

The key is a hash of architecture, dataset, seed, training config and the source of the
code that makes the weights (this module and the dataset's generator), so changing any of them
trains a new model and a second run with the same settings reuses the cache.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from tqdm.auto import tqdm

from patchbench.datasets import DATASETS, create_dataset
from patchbench.log import get_logger
from patchbench.models.adapter import ViTAdapter
from patchbench.registry import Registry
from patchbench.utils import atomic_path, cache_dir, file_digest, load_cached, stable_hash

LOG = get_logger(__name__)
MODELS: Registry[nn.Module] = Registry("model")
MEAN = STD = (0.5, 0.5, 0.5)
CHECKPOINT_FORMAT = 1


@MODELS.register("pb-vit-tiny")
def pb_vit_tiny(num_classes: int, img_size: tuple[int, int]) -> VisionTransformer:
    """4-block ViT, width 128, 4x4-pixel patches, class token (the default model)."""
    return VisionTransformer(img_size=img_size, patch_size=4, embed_dim=128, depth=4,
                             num_heads=4, mlp_ratio=2.0, num_classes=num_classes)


@dataclass(frozen=True)
class TrainConfig:
    """How an embedded model is trained (part of its cache key)."""

    train_size: int = 20_000
    test_size: int = 2_000
    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    seed: int = 0


def model_key(arch: str, dataset: str, cfg: TrainConfig) -> str:
    """Cache key: readable prefix plus a hash of everything that determines the weights.

    The code is part of it: a model cached by older training or data code would otherwise be
    reused under the same key, and scores (the regression reference's among them) would then
    depend on what a machine happened to have cached.
    """
    code = [file_digest(__file__), file_digest(inspect.getsourcefile(DATASETS.get(dataset)))]
    digest = stable_hash({"arch": arch, "dataset": dataset, "train": asdict(cfg),
                          "format": CHECKPOINT_FORMAT, "code": code})
    return f"{arch}_{dataset}_s{cfg.seed}_{digest}"


def build(arch: str, dataset: str) -> nn.Module:
    ds = create_dataset(dataset, "test", size=1)
    return MODELS.create(arch, num_classes=ds.num_classes, img_size=ds.image_size)


def train_model(arch: str, dataset: str, cfg: TrainConfig, progress: bool = True
                ) -> tuple[nn.Module, dict[str, Any]]:
    """Trains ``arch`` on ``dataset`` deterministically; returns the model and its metrics."""
    torch.manual_seed(cfg.seed)
    model = build(arch, dataset)
    train = create_dataset(dataset, "train", size=cfg.train_size, seed=cfg.seed)
    images, labels, _ = train.tensors()
    mean = torch.tensor(MEAN).view(1, -1, 1, 1)
    std = torch.tensor(STD).view(1, -1, 1, 1)
    images = (images - mean) / std
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    warmup = max(1, int(cfg.warmup_fraction * steps))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))
    g = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=steps, desc=f"train {arch} on {dataset}", disable=not progress)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(train), generator=g)
        for batch in order.split(cfg.batch_size):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    metrics = {"train_seconds": round(time.perf_counter() - start, 1),
               "test_accuracy": evaluate(model, dataset, cfg)}
    return model, metrics


@torch.no_grad()
def evaluate(model: nn.Module, dataset: str, cfg: TrainConfig) -> float:
    """Accuracy on the held-out test split (a different seed stream from training)."""
    test = create_dataset(dataset, "test", size=cfg.test_size, seed=cfg.seed)
    images, labels, _ = test.tensors()
    adapter = ViTAdapter(model, MEAN, STD)
    preds = torch.cat([adapter.logits(adapter.normalize(x)).argmax(1) for x in images.split(500)])
    return round((preds == labels).float().mean().item(), 4)


def checkpoint_path(key: str) -> Path:
    return cache_dir() / "models" / f"{key}.pt"


def load_model(arch: str = "pb-vit-tiny", dataset: str = "glyphs",
               cfg: TrainConfig | None = None, train_if_missing: bool = True,
               progress: bool = True) -> tuple[ViTAdapter, dict[str, Any]]:
    """The embedded model for ``(arch, dataset, cfg)``, trained and cached on first use.

    Returns:
        The adapter and the checkpoint's metadata (key, test accuracy, training time).
    """
    cfg = cfg or TrainConfig()
    MODELS.get(arch)  # unknown names fail here, listing the valid ones
    key = model_key(arch, dataset, cfg)
    path = checkpoint_path(key)
    ckpt = load_cached(path, ("state_dict", "meta"), "model")
    model = build(arch, dataset)
    if ckpt is not None and _loads(model, ckpt["state_dict"]):
        meta = ckpt["meta"]
    elif train_if_missing:
        model, metrics = train_model(arch, dataset, cfg, progress=progress)
        meta = {"key": key, "arch": arch, "dataset": dataset, "train_config": asdict(cfg),
                "mean": MEAN, "std": STD, **metrics}
        with atomic_path(path) as tmp:
            torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
    else:
        raise FileNotFoundError(f"no cached model {key} at {path}; run `patchbench train`")
    return ViTAdapter(model.eval(), MEAN, STD, key=key), meta


def _loads(model: nn.Module, state: Any) -> bool:
    try:
        model.load_state_dict(state)
        return True
    except (RuntimeError, TypeError, AttributeError) as e:  # wrong keys or shapes: rebuild it
        LOG.warning(f"patchbench: warning: cached model weights do not fit "
                    f"({' '.join(str(e).split())[:200]}); training it again")
        return False
