"""The distributed context of a run under ``torchrun`` (shared by FID sampling, teacher generation and tuning).

One process: ``DistContext()``. Under torchrun (``WORLD_SIZE`` > 1) a gloo process group is initialised (it works
on CPU, and carries only small objects here); each rank takes its own device (``select_device``) and its share of
the work, and all meet at barriers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and node-local rank of this process (``world_size == 1``: no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index among the processes on this machine: the GPU it uses (torchrun's LOCAL_RANK)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """``obj`` from rank 0 on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def distributed_context() -> DistContext:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun) and initialise a gloo group when there is more
    than one rank. Without ``LOCAL_RANK`` the local rank is the global rank (one machine)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    return DistContext(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", str(rank))))


def select_device(device: str | torch.device, ctx: DistContext) -> str:
    """The device this rank samples on.

    ``"cuda"`` without an index becomes ``"cuda:<local rank>"`` (so torchrun's ranks each get their own GPU instead
    of all landing on ``cuda:0``); a CUDA device is also made the current one (``torch.cuda.set_device``). Any
    other device is returned unchanged.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return str(device)
    index = ctx.local_rank if dev.index is None else dev.index
    visible = torch.cuda.device_count()
    if index >= visible:
        raise RuntimeError(f"device {device!r} on rank {ctx.rank} (LOCAL_RANK {ctx.local_rank}) needs cuda:{index}, "
                           f"but only {visible} CUDA device(s) are visible")
    torch.cuda.set_device(index)
    return f"cuda:{index}"
