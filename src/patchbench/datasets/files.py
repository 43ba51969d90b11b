"""Datasets read from disk: CIFAR-10 python batches and class-per-folder image trees.

They have no ground-truth masks (the mask is all False and ``has_ground_truth`` is False).
``limit`` keeps a class-stratified, seeded subset: never the first N in order, which on an
ImageNet validation folder would be a handful of classes.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from patchbench.datasets.base import select_samples
from patchbench.datasets.synthetic import DATASETS

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


class FileDataset(Dataset):
    """Common part: labels known up front, images loaded per index, optional stratified limit.

    Attributes:
        transform: Brings each image, as it is read, to the model's input: PIL image ->
            ``[3, H, W]`` in [0, 1] (the model adapter's ``pixel_transform()``), so images of
            any size and mode work. Without one, images keep their own size.
    """

    name = "files"
    has_ground_truth = False
    has_train_split = True
    num_classes = 0
    transform: Callable[[Any], Tensor] | None = None

    def __init__(self, labels: list[int], limit: int | None, seed: int) -> None:
        self.seed = seed
        all_labels = torch.tensor(labels, dtype=torch.int64)
        if limit is not None and limit < len(labels):
            self.indices = select_samples(all_labels, limit, seed)
        else:
            self.indices = list(range(len(labels)))
        self.labels = all_labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> np.ndarray:
        """Image ``index`` (of the full set) as ``[H, W, 3]`` uint8."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Tensor, int, Tensor]:
        pixels = np.array(self.load(self.indices[i]), dtype=np.uint8)
        if self.transform is not None:
            from PIL import Image

            image = self.transform(Image.fromarray(pixels))
        else:
            image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
        return image, int(self.labels[i]), torch.zeros(image.shape[1:], dtype=torch.bool)

    def mean_colour(self) -> tuple[float, float, float]:
        """Mean RGB in [0, 1] over every pixel of every image of this split, as stored."""
        total, count = np.zeros(3), 0
        for index in self.indices:
            pixels = np.asarray(self.load(index), dtype=np.float64).reshape(-1, 3)
            total += pixels.sum(0)
            count += len(pixels)
        return tuple(float(v) for v in total / count / 255)

    def identity(self) -> dict[str, Any]:
        """What identifies the files read, beyond their root folder (part of cache keys)."""
        return {}

    def tensors(self, indices: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Stacked images ``[N, 3, H, W]``, labels ``[N]`` and (empty) masks ``[N, H, W]``."""
        samples = [self[i] for i in (range(len(self)) if indices is None else indices)]
        shapes = {tuple(s[0].shape) for s in samples}
        if len(shapes) > 1:
            raise ValueError(f"{self.name}: images have different sizes {sorted(shapes)[:4]}; "
                             "give the dataset the model's transform (adapter.pixel_transform())")
        images, labels, masks = zip(*samples)
        return torch.stack(images), torch.tensor(labels), torch.stack(masks)


CIFAR_LAYOUT = ("a folder with the CIFAR-10 python batches: data_batch_1 … data_batch_5, "
                "test_batch and batches.meta (as unpacked from cifar-10-python.tar.gz), or its "
                "parent holding cifar-10-batches-py/")


@DATASETS.register("cifar10")
class Cifar10(FileDataset):
    """CIFAR-10 from the standard python-pickle batches, 32x32, 10 classes.

    Args:
        split: ``train`` (data_batch_1-5) or ``test`` (test_batch).
        data_root: See ``CIFAR_LAYOUT``.
        limit: Keep this many images, stratified over classes.
        seed: Seed of the stratified subset.
    """

    name = "cifar10"
    num_classes = 10
    image_size = (32, 32)

    def __init__(self, split: str = "test", data_root: str | Path | None = None,
                 limit: int | None = None, seed: int = 0) -> None:
        if data_root is None:
            raise ValueError(f"cifar10 needs --data-root: {CIFAR_LAYOUT}")
        root = Path(data_root)
        if (root / "cifar-10-batches-py").is_dir():
            root = root / "cifar-10-batches-py"
        names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        if split not in names:
            raise ValueError(f"unknown split {split!r}; valid splits: train, test")
        missing = [n for n in names[split] if not (root / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{root} has no {', '.join(missing)}; expected {CIFAR_LAYOUT}")
        self.files = [root / n for n in names[split]]
        data, labels = [], []
        for n in names[split]:
            batch = read_cifar_pickle(root / n)
            try:
                data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels += [int(v) for v in batch[b"labels"]]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{root / n} is not a CIFAR-10 batch (expected keys b'data' "
                                 f"[N, 3072] uint8 and b'labels'): {e}") from None
        self.data = np.concatenate(data).transpose(0, 2, 3, 1)
        self.classes = [str(i) for i in range(10)]
        meta = root / "batches.meta"
        if meta.is_file():
            try:
                self.classes = [c.decode() for c in read_cifar_pickle(meta)[b"label_names"]]
            except (KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{meta} is not CIFAR-10 metadata (expected b'label_names', a list "
                                 f"of bytes): {e}") from None
        super().__init__(labels, limit, seed)

    def load(self, index: int) -> np.ndarray:
        return self.data[index]

    def mean_colour(self) -> tuple[float, float, float]:
        data = self.data[self.indices].reshape(-1, 3)
        return tuple(float(v) for v in data.mean(0, dtype=np.float64) / 255)

    def identity(self) -> dict[str, Any]:
        return {"files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a CIFAR batch from a stranger cannot run code.

    ``pickle.load`` calls whatever callable a file names; here any name outside the few a
    numpy array needs is refused before it is looked up.
    """

    # _codecs.encode rebuilds bytes in protocol-2 pickles written by Python 3 (as torch's
    # weights_only loader also allows); it only converts a string to bytes
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               *((f"numpy.{core}.multiarray", n) for core in ("core", "_core")
                 for n in ("_reconstruct", "scalar")),
               *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core"))}  # protocol 5

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, and a CIFAR-10 batch holds only "
                                         "dicts, lists, bytes, strings, numbers and numpy arrays")
        return super().find_class(module, name)


def read_cifar_pickle(path: Path) -> dict:
    """A CIFAR-10 python batch, read without running code from the file.

    Raises:
        ValueError: The file is truncated, not a pickle, names anything but plain data and
            numpy arrays, or is not a dict; the message names the file.
    """
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a damaged pickle fails in many ways; all mean "not a batch"
        raise ValueError(f"{path} is not a readable CIFAR-10 batch: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch: it holds a {type(obj).__name__}, not a dict")
    return obj


@DATASETS.register("imagefolder")
class ImageFolder(FileDataset):
    """Any class-per-folder tree: ``root/<class>/<image>``, ImageNet validation included.

    Classes are the sorted folder names (the standard ImageNet order for synset folders), or
    come from ``class_index``: a JSON file mapping either index -> [folder, name] (ImageNet's
    ``imagenet_class_index.json``) or folder -> index.

    Args:
        split: Ignored (the folder is the split); kept for a uniform interface.
        data_root: The root folder.
        class_index: Optional JSON file fixing the class order.
        limit: Keep this many images, stratified over classes.
        seed: Seed of the stratified subset.
    """

    name = "imagefolder"
    has_train_split = False  # the folder is the split it was given

    def __init__(self, split: str = "test", data_root: str | Path | None = None,
                 class_index: str | Path | None = None, limit: int | None = None,
                 seed: int = 0) -> None:
        if data_root is None:
            raise ValueError("imagefolder needs --data-root: a folder with one sub-folder of "
                             "images per class")
        root = Path(data_root)
        folders = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        if not folders:
            raise FileNotFoundError(f"{root} has no class sub-folders; expected root/<class>/<image> "
                                    f"with images ending in {', '.join(sorted(IMAGE_EXTENSIONS))}")
        default = {f: i for i, f in enumerate(folders)}
        mapping = _class_mapping(class_index) if class_index else default
        unknown = [f for f in folders if f not in mapping]
        if unknown:
            raise ValueError(f"folders {unknown[:5]} are not in the class index {class_index}")
        self.num_classes = max(mapping.values()) + 1
        self.classes = folders
        self.paths: list[Path] = []
        labels = []
        for folder in folders:
            for p in sorted((root / folder).iterdir()):
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    self.paths.append(p)
                    labels.append(mapping[folder])
        if not self.paths:
            raise FileNotFoundError(f"no images under {root}/<class>/ (extensions: "
                                    f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        super().__init__(labels, limit, seed)

    def load(self, index: int) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(self.paths[index]) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"{self.paths[index]} is not a readable image: {e}") from None

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "n": len(self), "seed": self.seed}


def _class_mapping(path: str | Path) -> dict[str, int]:
    raw = json.loads(Path(path).read_text())
    if all(isinstance(v, list) for v in raw.values()):  # {"0": ["n01440764", "tench"], ...}
        return {v[0]: int(k) for k, v in raw.items()}
    return {str(k): int(v) for k, v in raw.items()}
