"""The paper's toy claim on the embedded default: DiffMask recovers the red cells of toy-count.

Trains the default toy-count model and a DiffMask explainer with the default config (about
1.5 min on 2 CPU cores the first time; both are cached afterwards).
"""

import torch

from patchbench.datasets import create_dataset
from patchbench.methods import create_method
from patchbench.methods.diffmask_train import train_or_load
from patchbench.metrics import patch_auroc
from patchbench.models import load_model


def test_diffmask_recovers_red_cells_and_beats_baselines():
    adapter, _ = load_model("pb-vit-tiny", "toy-count", progress=False)
    ckpt = train_or_load(adapter, "toy-count", progress=False)
    x, _, m = create_dataset("toy-count", "test", size=100).tensors()
    images = adapter.normalize(x)
    with torch.no_grad():
        target = adapter.logits(images).argmax(1)
    truth = adapter.pixel_to_patch(m)
    auroc = {name: patch_auroc(create_method(name, adapter, **opts).attribute(images, target), truth)
             .nanmean().item()
             for name, opts in [("diffmask", {"checkpoint": ckpt}), ("integrated_gradients", {}),
                                ("rollout", {}), ("gradcam", {}), ("attention", {})]}
    assert auroc["diffmask"] >= 0.95, auroc
    assert auroc["diffmask"] > max(v for k, v in auroc.items() if k != "diffmask"), auroc
