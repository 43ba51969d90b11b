"""Content-addressed result chunks: an interrupted run recomputes only what is missing.

A chunk is one unit of work (a method's maps on a dataset, or its curves under one operator)
stored under a hash of everything that determines it: model key, data and sample ids, method
and its config, operator and metric config, patchbench version. Each file holds its full key
and a checksum of its tensors; a file that is truncated, corrupt or written for another key is
reported and recomputed. Writes are atomic, so a SIGKILL leaves either a whole chunk or none.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchbench.errors import MissingChunkError
from patchbench.utils import atomic_path, stable_hash

__all__ = ["ChunkStore", "MissingChunkError", "checksum"]

OVERWRITE = ("never", "missing", "always")


def checksum(payload: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(payload):
        t = payload[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ChunkStore:
    """Stores and reuses result chunks in ``root``.

    Args:
        root: Folder of the chunk files (shared by runs: chunks are keyed by content).
        overwrite: ``missing`` (default): reuse what is stored, compute the rest;
            ``always``: recompute and rewrite everything; ``never``: compute nothing, fail
            on a missing chunk (to re-render tables from stored results).
        warn: Where problems with stored chunks are reported.
    """

    def __init__(self, root: str | Path, overwrite: str = "missing",
                 warn: Callable[[str], None] = print) -> None:
        if overwrite not in OVERWRITE:
            raise ValueError(f"overwrite must be one of {', '.join(OVERWRITE)}, got {overwrite!r}")
        self.root = Path(root)
        self.overwrite = overwrite
        self.warn = warn
        self.reused = 0
        self.computed = 0

    def path(self, key: dict[str, Any]) -> Path:
        return self.root / f"{key['kind']}-{stable_hash(key, 24)}.pt"

    def get(self, key: dict[str, Any], compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
        """The stored payload for ``key``, or ``compute()``'s, stored before it is returned."""
        path = self.path(key)
        if self.overwrite != "always" and path.exists():
            payload = self._load(path, key)
            if payload is not None:
                self.reused += 1
                return payload
        if self.overwrite == "never":
            raise MissingChunkError(f"--overwrite never, and no stored result for {_describe(key)} "
                                    f"({path.name})")
        payload = {k: v.detach().cpu() for k, v in compute().items()}
        with atomic_path(path) as tmp:
            torch.save({"key": key, "checksum": checksum(payload), "payload": payload}, tmp)
        self.computed += 1
        return payload

    def _load(self, path: Path, key: dict[str, Any]) -> dict[str, Tensor] | None:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            ok = (isinstance(obj, dict) and obj.get("key") == key
                  and obj.get("checksum") == checksum(obj["payload"]))
        except Exception as e:  # truncated zip, bad pickle, missing fields: all mean "recompute"
            self.warn(f"patchbench: stored result {path.name} is unreadable ({type(e).__name__}: {e}); "
                      "recomputing it")
            return None
        if not ok:
            self.warn(f"patchbench: stored result {path.name} does not match its key or checksum; "
                      "recomputing it")
            return None
        return obj["payload"]


def _describe(key: dict[str, Any]) -> str:
    parts = [str(key.get(k)) for k in ("dataset", "method", "operator") if k in key]
    return f"{key['kind']} of " + " / ".join(parts)
