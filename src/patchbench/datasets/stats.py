"""Dataset statistics that removal operators need: a property of the dataset, not of a run.

The ``mean`` operator fills removed patches with the dataset's mean colour. Taken over the
images a run evaluates, one image's score would change with ``--n-images``; taken over the
training split (computed once, cached beside the models) it is the same for every run.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from patchbench.datasets import DATASETS, create_dataset
from patchbench.datasets.files import FileDataset
from patchbench.utils import cache_dir, stable_hash, write_json


def train_mean_colour(name: str, seed: int = 0, data_root: str | None = None,
                      options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Mean colour of ``name``'s training split, in pixel values [0, 1].

    Args:
        name: Registered dataset name.
        seed: Generation seed of a generated dataset (the one its model was trained on).
        data_root: Folder of a dataset on disk.
        options: The dataset's options (``dataset_options``).

    Returns:
        ``{"rgb": [r, g, b], "source": "..."}``, or None when the dataset has no training
        split (an image folder): the model's normalisation mean is the fallback then.
    """
    cls = DATASETS.get(name)
    if not getattr(cls, "has_train_split", True):
        return None
    options = options or {}
    if issubclass(cls, FileDataset):
        ds = create_dataset(name, "train", data_root=data_root, seed=seed, **options)
        key = {"data_root": str(Path(data_root).resolve()) if data_root else None, **ds.identity()}
    else:
        ds = create_dataset(name, "train", seed=seed, **options)
        key = {**ds.config(), "code": stable_hash(inspect.getsource(cls), 16)}
    key = {"dataset": name, "options": options, **key}
    path = cache_dir() / "stats" / f"{name}-mean-{stable_hash(key, 16)}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == json.loads(json.dumps(key, default=str)):
            return cached["colour"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # missing or damaged: computed again
    colour = {"rgb": [round(v, 6) for v in ds.mean_colour()],
              "source": f"mean of the {name} training split ({len(ds)} images)"}
    write_json(path, {"key": key, "colour": colour})
    return colour
