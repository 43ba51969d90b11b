"""Maps computed elsewhere, read from a file and scored like any method (``--maps FILE``).

A maps file is a ``.pt``, ``.npz`` or ``.safetensors`` file holding either

- one tensor ``[N, Hp, Wp]`` (under the key ``maps`` in ``.npz``/``.safetensors``) for the
  run's N images in sample order (``run.json``'s ``sample_ids``), or
- one map ``[Hp, Wp]`` per sample id: a dict ``{id: map}`` in ``.pt``, keys ``"<id>"`` in
  ``.npz``/``.safetensors``.

The run's images are matched to their maps by content, so batching, sharding and the other
methods' order do not matter. A missing id, a map of another shape or a non-finite value is
an error that names the file and the sample.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from patchbench.methods.base import METHODS, Method
from patchbench.models.adapter import ImageAdapter
from patchbench.utils import tensor_digest

SUFFIXES = (".pt", ".pth", ".npz", ".safetensors")


class MapsFileError(ValueError):
    """A maps file that does not fit the run."""


def read_maps(path: str | Path) -> Tensor | dict[int, Tensor]:
    """A maps file's content: ``[N, Hp, Wp]`` in sample order, or sample id -> ``[Hp, Wp]``."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise MapsFileError(f"{path}: a maps file is {', '.join(SUFFIXES)}, "
                            f"not {path.suffix or 'a file without suffix'}")
    if not path.is_file():
        raise FileNotFoundError(f"no maps file {path}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                raw: Any = {k: torch.from_numpy(f[k]) for k in f.files}
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged or not a file of that kind
        raise MapsFileError(f"{path} is not a readable {path.suffix} file: {e}") from None
    if isinstance(raw, dict) and set(raw) == {"maps"}:
        raw = raw["maps"]
    if isinstance(raw, Tensor):
        if raw.ndim != 3:
            raise MapsFileError(f"{path}: expected maps [N, Hp, Wp] in sample order, "
                                f"got {list(raw.shape)}")
        return raw.float()
    if not isinstance(raw, dict):
        raise MapsFileError(f"{path}: expected a tensor [N, Hp, Wp] or sample id -> map, "
                            f"got {type(raw).__name__}")
    try:
        return {int(k): torch.as_tensor(v).float() for k, v in raw.items()}
    except (TypeError, ValueError):
        raise MapsFileError(f"{path}: keys must be sample ids (integers), "
                            f"got e.g. {next(iter(raw))!r}") from None


def image_digest(image: Tensor) -> str:
    """Identifies an image by its pixels (a model input ``[3, H, W]``)."""
    return tensor_digest(image.float())


class PrecomputedMaps(Method):
    """Maps read from a file, not computed: see the module's docstring for the format.

    Args:
        file: The maps file.
        lookup: Image digest -> map ``[Hp, Wp]``, made by :meth:`options_from_run` from the
            run's sample ids and images.
    """

    name = "maps"
    sanity_checkable = False
    sanity_note = "maps read from a file: nothing to recompute on a randomised model"
    file: str = ""

    @classmethod
    def options_from_run(cls, run: Any, options: dict[str, Any]) -> dict[str, Any]:
        file = options.setdefault("file", cls.file)
        maps = read_maps(file)
        ids = run.sample_ids
        if isinstance(maps, Tensor):
            if len(maps) != len(ids):
                raise MapsFileError(f"{file} has {len(maps)} maps in sample order; the run evaluates "
                                    f"{len(ids)} images of {run.dataset}")
            maps = dict(zip(ids, maps))
        missing = [i for i in ids if i not in maps]
        if missing:
            raise MapsFileError(f"{file} has no map for {len(missing)} of the {len(ids)} sample ids of "
                                f"{run.dataset} (e.g. {missing[:5]}); the ids are in run.json's sample_ids")
        grid = tuple(run.adapter.grid)
        for i in ids:
            if tuple(maps[i].shape) != grid:
                raise MapsFileError(f"{file}: the map of sample {i} is {list(maps[i].shape)}, the model's "
                                    f"patch grid is {list(grid)}")
            if not torch.isfinite(maps[i]).all():
                raise MapsFileError(f"{file}: the map of sample {i} has NaN or infinite values")
        options["lookup"] = {image_digest(x): maps[i] for i, x in zip(run.ids, run.images)}
        return options

    def __init__(self, adapter: ImageAdapter, file: str = "", lookup: dict[str, Tensor] | None = None
                 ) -> None:
        super().__init__(adapter)
        self.file = str(file)
        self.lookup = lookup or {}
        self.digest = hashlib.sha256(Path(file).read_bytes()).hexdigest()[:16] if file else None

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "sha256": self.digest}

    def _attribute(self, images: Tensor, target: Tensor) -> Tensor:
        try:
            return torch.stack([self.lookup[image_digest(x)] for x in images]).to(images.device)
        except KeyError:
            raise MapsFileError(f"{self.file}: an image without a map (maps files serve the run's "
                                "own images only)") from None


def register_maps_file(path: str | Path) -> str:
    """Registers ``maps:<file stem>`` for a maps file (once) and returns that method name."""
    path = Path(path)
    name = f"maps:{path.stem}"
    if name in METHODS:
        if getattr(METHODS.get(name), "file", None) != str(path):
            raise MapsFileError(f"two maps files named {path.stem!r}: rename one ({path}, "
                                f"{METHODS.get(name).file})")
        return name
    cls = type(f"Maps_{path.stem}", (PrecomputedMaps,), {"name": name, "file": str(path),
                                                         "__doc__": f"Maps read from {path}."})
    METHODS.register(name)(cls)
    return name
