"""torch.distributed set-up for runs launched by torchrun; a single process needs none of it.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE (and MASTER_ADDR/PORT) for every process it starts, on one machine
(--nproc_per_node) or several (--nnodes). NCCL is used between GPUs and gloo on CPU; each process drives the GPU
cuda:LOCAL_RANK. Only rank 0 prints, logs and writes files; the others compute and take part in the collectives.

Two rules keep the processes from waiting on each other forever:
- every collective here is entered by every rank, in the same order;
- set-up steps that can fail with a UserError on some ranks only (a missing file, an output directory that
  cannot be written) run inside `collectively`, which makes all ranks agree on success before going on: the
  failing rank reports its error, the others stop quietly instead of hanging or dying on a broken connection.

Small control messages (stop requests, RNG states, votes) travel over a gloo group on the CPU even when the
gradients go through NCCL, so checking them costs no GPU synchronisation.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fundamentallm.errors import UserError


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

    @property
    def is_local_main(self) -> bool:
        """The first process on its machine: it builds that machine's token cache."""
        return self.local_rank == 0


SINGLE = Dist()
_control: Any = None  # the CPU (gloo) group for control messages; None: the default group is gloo already


class PeerFailed(UserError):
    """Another process stopped with an error and reports it; this one stops too. Rank 0 names the failed
    ranks (their messages may be in another machine's log); the other ranks stay silent."""

    def __init__(self, failed: list[int], quiet: bool) -> None:
        ranks = ", ".join(map(str, failed))
        super().__init__(f"process(es) of rank {ranks} stopped with an error (see their message); stopping too")
        self.quiet = quiet


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes, and return it with this process's device.

    A single process (no torchrun, or --nproc_per_node=1) needs no group and keeps `device` as it is."""
    global _control
    if not launched_by_torchrun():
        return SINGLE, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "mps":
        raise UserError("torchrun with --device mps is not supported (PyTorch has no MPS backend for "
                        "torch.distributed); use --device cpu, or one process without torchrun")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(f"torchrun started process {local_rank} on this machine, but it has only {count} "
                            f"GPU(s); use --nproc_per_node={count} (or fewer)")
        device = torch.device("cuda", local_rank)  # each process drives its own GPU, whatever --device named
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        # Every rank must create the group, even though only NCCL runs need it.
        _control = dist.new_group(backend="gloo") if device.type == "cuda" else None
    info = Dist(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size())
    return info, device


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier(group=_control)


def all_reduce_sum(info: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (on its device: NCCL for GPU tensors)."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(info: Dist, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (e.g. a stop request seen by one process)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return bool(t.item())


def smallest_on_all_ranks(info: Dist, value: int) -> int:
    """The smallest of every rank's integer, on every rank (e.g. a number of steps each rank planned from its
    own clock: they must agree, or the ranks would wait for each other forever)."""
    if not info.enabled:
        return value
    t = torch.tensor([-value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return -int(t.item())


def same_on_all_ranks(info: Dist, value: int) -> bool:
    """Whether every rank holds the same integer (e.g. the step a resumed run starts from)."""
    if not info.enabled:
        return True
    t = torch.tensor([value, -value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return int(t[0]) == -int(t[1])  # max == min


def all_gather_object(info: Dist, obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order (small things only: RNG states)."""
    if not info.enabled:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj, group=_control)
    return gathered


@contextlib.contextmanager
def collectively(info: Dist) -> Iterator[None]:
    """Run a set-up step that may fail on some ranks only (with any exception); afterwards all ranks agree.

    Every rank votes once when the block ends (this is also a barrier). A rank whose block raised re-raises its
    own error; the others raise PeerFailed, so that all stop with exit code 2 and nobody waits forever in a
    later collective. Blocks must not contain collectives themselves."""
    if not info.enabled:
        yield
        return
    try:
        yield
    except BaseException:  # a UserError, or anything else (e.g. a corrupt file the reader did not expect)
        _vote(info, failed=True)
        raise
    failed = _vote(info, failed=False)
    if failed:
        raise PeerFailed(failed, quiet=not info.is_main)


def _vote(info: Dist, failed: bool) -> list[int]:
    votes = torch.zeros(info.world_size, dtype=torch.int32)
    votes[info.rank] = 1 if failed else 0
    dist.all_reduce(votes, op=dist.ReduceOp.SUM, group=_control)
    return [rank for rank, v in enumerate(votes.tolist()) if v]


def shutdown(info: Dist) -> None:
    global _control
    if info.enabled and dist.is_initialized():
        # DDP sits in reference cycles. Collect them now, so that the process group is freed here rather than
        # during interpreter teardown, where gloo aborted the process ("terminate called without an active
        # exception") in about one run in ten.
        gc.collect()
        dist.destroy_process_group()
        _control = None
