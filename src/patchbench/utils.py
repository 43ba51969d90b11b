"""Small shared helpers: atomic writes, seeding, provenance."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchbench.log import get_logger


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 would hide results from the user's group
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def umask() -> int:
    """The process's file-creation mask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new folder in ``parent`` with the permissions of an ordinary ``mkdir`` (not 0700)."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, 0o777 & ~umask())
    return path


def tensor_digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' contents (identifies images or data given as tensors)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def file_digest(path: str | Path | None) -> str | None:
    """Hash of one source file (a method's, an operator's, the training code), or None."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else None


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (name, dtype, shape and bytes) of ``model``.

    Cheap next to a benchmark (one pass over the weights), and it sees any in-place edit,
    so stored results can be tied to the weights that produced them.
    """
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def write_text(path: str | Path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def stable_hash(obj: Any, length: int = 10) -> str:
    """Short hex digest of a JSON-serialisable object (key order does not matter)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def load_cached(path: Path, keys: tuple[str, ...], what: str) -> dict[str, Any] | None:
    """A cached checkpoint holding ``keys``, or None (with a warning) when it is damaged.

    A cache file is ours to rebuild: a truncated or corrupt one means "train it again",
    never a traceback.
    """
    if not path.exists():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and all(k in obj for k in keys):
            return obj
        problem = f"expected keys {', '.join(keys)}"
    except Exception as e:  # truncated zip, bad pickle: all mean "rebuild"
        problem = f"{type(e).__name__}: {e}"
    get_logger(__name__).warning(f"patchbench: warning: cached {what} {path} is unreadable "
                                 f"({' '.join(problem.split())}); training it again")
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cache_dir() -> Path:
    """Where trained models are cached: ``$PATCHBENCH_CACHE`` or ``~/.cache/patchbench``."""
    root = os.environ.get("PATCHBENCH_CACHE") or Path.home() / ".cache" / "patchbench"
    return Path(root)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def git_dirty() -> bool | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


PACKAGES = ("patchbench", "torch", "torchvision", "timm", "captum", "grad-cam", "numpy", "pandas")


def provenance() -> dict[str, Any]:
    """Git commit, package versions and machine, for ``run.json``."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first GPU when CUDA is available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str | None) -> Any:
    """Mixed precision on GPU when asked (``bf16``/``fp16``); a no-op otherwise. Log-softmax,
    KL and AUCs are computed in float32 whatever the forward pass's precision."""
    if precision is None or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # so timings measure the work, not the kernel launches
        torch.cuda.synchronize(device)
