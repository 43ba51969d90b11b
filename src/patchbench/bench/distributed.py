"""Sharding a run over processes started by torchrun (one node or several).

``torchrun --nproc_per_node N -m patchbench bench ...`` starts N copies of the command with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. Each rank scores its own slice of the images
(gloo on CPU, NCCL on GPUs, each rank on ``cuda:LOCAL_RANK``); rank 0 gathers the rows and
writes the run. Without those variables everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the ranks.

    Attributes:
        rank: Global rank (0 writes the results).
        size: Number of ranks.
        local_rank: Rank on this node (picks the GPU).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def sharded(self) -> bool:
        return self.size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous block of ``n`` items (sizes differ by at most one)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0, in rank order (None on the other ranks)."""
        if not self.sharded:
            return [obj]
        out = [None] * self.size if self.is_writer else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.sharded:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks."""
        if not self.sharded:
            return list(values)
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, list(values))
        return [sum(column) for column in zip(*out)]

    @contextmanager
    def local_rank0_first(self) -> Iterator[None]:
        """Rank 0 of each node runs the block first (training into the shared cache), then the rest
        (which find the result cached)."""
        if self.sharded and self.local_rank != 0:
            dist.barrier()
        yield
        if self.sharded and self.local_rank == 0:
            dist.barrier()


def init_world(device: str) -> tuple[World, str]:
    """Joins torchrun's process group when launched by it.

    Args:
        device: The configured device (``auto``, ``cpu``, ``cuda``...).

    Returns:
        The world and the device this rank uses: ``cuda:LOCAL_RANK`` when the run is on GPUs.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World(), device
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                  int(os.environ.get("LOCAL_RANK", "0")))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(world.local_rank)
        device = f"cuda:{world.local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return world, device


def close_world(world: World) -> None:
    if world.sharded and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
