"""Fine-tune any timm model on a dataset read from disk, with checkpoints and exact resume.

For users who need, e.g., a CIFAR-10 ViT to benchmark::

    patchbench train --model vit_small_patch16_224 --pretrained --dataset cifar10 --data-root DIR

writes ``OUT/last.pt`` (weights, optimiser, schedule and position, rewritten atomically every
``save_every`` steps and at the end of every epoch) and, when done, ``OUT/model.safetensors``
and ``OUT/metrics.json``. Running the same command again resumes from ``last.pt``: the batch
order of an epoch is a function of (seed, epoch), so a resumed run takes the same steps as
an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from patchbench.datasets import DATASETS, create_dataset
from patchbench.datasets.files import FileDataset
from patchbench.models.hub import create_timm_model
from patchbench.utils import atomic_path, resolve_device, write_json
from patchbench.utils import autocast as autocast_ctx


@dataclass(frozen=True)
class FinetuneConfig:
    """How a model is fine-tuned (saved in the checkpoint; a resume must use the same).

    Attributes:
        epochs: Passes over the training images.
        batch_size: Images per step.
        lr: Peak AdamW learning rate (after warm-up; cosine decay to 0).
        weight_decay: AdamW weight decay.
        warmup_fraction: Share of all steps spent warming up linearly.
        limit: Train on this many images (class-stratified, seeded); None = all.
        eval_images: Test images for the final accuracy (class-stratified).
        flip: Random horizontal flips (seeded per step).
        seed: Seed of the subset, batch order, flips and a new classifier's init.
    """

    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    limit: int | None = None
    eval_images: int = 2000
    flip: bool = True
    seed: int = 0


def finetune(model: str, dataset: str, data_root: str, out: str | Path,
             cfg: FinetuneConfig | None = None, pretrained: bool = False,
             checkpoint: str | None = None, device: str = "auto", autocast: str | None = None,
             save_every: int = 200, max_steps: int | None = None, resume: bool = True,
             eval_data_root: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tunes ``model`` on ``dataset`` and writes checkpoints to ``out``.

    Args:
        model: A timm model name.
        dataset: A dataset on disk (``cifar10``, ``imagefolder``).
        data_root: Its folder (for ``imagefolder``, the training folder).
        out: Output folder.
        cfg: Training settings.
        pretrained: Start from timm's pretrained weights.
        checkpoint: Start from these local weights instead.
        device: ``auto``, ``cpu``, ``cuda``...
        autocast: ``bf16`` or ``fp16`` mixed precision on GPU.
        save_every: Steps between checkpoints.
        max_steps: Stop after this many steps in total (for a time budget; resumable).
        resume: Continue from ``out/last.pt`` when it exists.
        eval_data_root: Evaluation folder when the test split is not in ``data_root``
            (``imagefolder``); by default the dataset's ``test`` split there.
        progress: Show a progress bar.

    Returns:
        Metrics: steps done, whether training finished, train loss, test accuracy, paths.
    """
    cfg = cfg or FinetuneConfig()
    if not issubclass(DATASETS.get(dataset), FileDataset):
        raise ValueError(f"fine-tuning reads a dataset from disk (cifar10, imagefolder), not {dataset!r}; "
                         "embedded models train on generated data (`patchbench train --model pb-vit-tiny`)")
    out = Path(out)
    dev = resolve_device(device)
    train = create_dataset(dataset, "train", data_root=data_root, limit=cfg.limit, seed=cfg.seed)
    num_classes = train.num_classes or int(train.labels.max()) + 1
    torch.manual_seed(cfg.seed)  # a new classifier's init
    adapter, meta = create_timm_model(model, pretrained, checkpoint)
    train.transform = adapter.pixel_transform()  # images of any size, as timm evaluates
    net = adapter.model
    if net.num_classes != num_classes:
        net.reset_classifier(num_classes)
    net.to(dev)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_fraction * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s + 1 - warmup) / max(1, total - warmup))))))
    step, losses = 0, []
    last = out / "last.pt"
    if resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        if state["config"] != asdict(cfg) or state["model"] != model:
            raise ValueError(f"{last} was written by another run (model {state['model']!r}, config "
                             f"{state['config']}); use another --out or --no-resume")
        net.load_state_dict(state["weights"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, losses = state["step"], state["losses"]

    def save() -> None:
        with atomic_path(last) as tmp:
            torch.save({"model": model, "config": asdict(cfg), "step": step, "losses": losses,
                        "weights": net.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "num_classes": num_classes}, tmp)

    net.train()
    bar = tqdm(total=total, initial=step, desc=f"fine-tune {model} on {dataset}", disable=not progress)
    start = time.perf_counter()
    stop = total if max_steps is None else min(total, max_steps)
    while step < stop:
        epoch, within = divmod(step, steps_per_epoch)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        idx = order[within * cfg.batch_size:(within + 1) * cfg.batch_size]
        x, y = _batch(train, idx, adapter)
        if cfg.flip:
            g = torch.Generator().manual_seed(cfg.seed * 10**6 + step)
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        with autocast_ctx(dev, autocast):
            loss = F.cross_entropy(net(x.to(dev)).float(), y.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        losses.append(round(loss.item(), 5))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step % save_every == 0 or step % steps_per_epoch == 0 or step == stop:
            save()
    bar.close()
    net.eval()
    metrics: dict[str, Any] = {"model": model, "dataset": dataset, "steps": step, "total_steps": total,
                               "finished": step >= total, "config": asdict(cfg),
                               "train_loss_last_50": sum(losses[-50:]) / max(1, len(losses[-50:])),
                               "seconds_this_session": round(time.perf_counter() - start, 1),
                               "last_checkpoint": str(last)}
    if step >= total:
        test = create_dataset(dataset, "test", data_root=eval_data_root or data_root,
                              limit=cfg.eval_images, seed=cfg.seed)
        test.transform = train.transform
        # an image folder is its own split: without eval_data_root this is training-set accuracy
        name = "train_folder_accuracy" if dataset == "imagefolder" and not eval_data_root else "test_accuracy"
        metrics["eval_images"] = len(test)
        metrics[name] = round(_accuracy(adapter, test, cfg.batch_size, dev, autocast), 4)
        from safetensors.torch import save_file

        weights = out / "model.safetensors"
        with atomic_path(weights) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))
        metrics["weights"] = str(weights)
        metrics["bench"] = (f"patchbench bench --model {model} --checkpoint {weights} "
                            f"--datasets {dataset} --data-root {eval_data_root or data_root}")
        write_json(out / "metrics.json", metrics)
    return metrics


def _batch(dataset: Any, idx: Tensor, adapter: Any) -> tuple[Tensor, Tensor]:
    samples = [dataset[int(i)] for i in idx]
    images = torch.cat([adapter.prepare(s[0].unsqueeze(0)) for s in samples])
    return images, torch.tensor([s[1] for s in samples])


@torch.no_grad()
def _accuracy(adapter: Any, dataset: Any, batch_size: int, dev: torch.device, autocast: str | None) -> float:
    correct = 0
    for idx in torch.arange(len(dataset)).split(batch_size):
        x, y = _batch(dataset, idx, adapter)
        with autocast_ctx(dev, autocast):
            correct += int((adapter.model(x.to(dev)).argmax(1).cpu() == y).sum())
    return correct / max(1, len(dataset))

