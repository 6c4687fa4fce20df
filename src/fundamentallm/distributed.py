"""torch.distributed set-up for runs launched by torchrun; a single process needs none of it.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. NCCL is used between GPUs and gloo on CPU. Only rank 0 prints,
logs and writes files; the others compute and take part in the collectives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(use_cuda: bool) -> Dist:
    """Join the process group torchrun describes (no-op for a single process)."""
    if not launched_by_torchrun():
        return SINGLE
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                world_size=dist.get_world_size())


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(info: Dist, tensor: torch.Tensor) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(info: Dist, flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (e.g. a stop request seen by one process)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shutdown(info: Dist) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
