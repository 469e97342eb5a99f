"""Where this process stands in a ``torchrun`` run: one class every multi-process command shares.

Commands that scale out (ranking, stand-alone training) are launched with
``torchrun --nproc_per_node N -m fastsupernet ...``; :func:`process_group_from_env` joins the
group torchrun describes (gloo on CPU, NCCL on CUDA) or returns a single-process group.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ProcessGroup", "process_group_from_env"]


@dataclass
class ProcessGroup:
    """This process's place in a (possibly one-process) run.

    ``ProcessGroup()`` is a single process. :func:`process_group_from_env` joins the group
    ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1): gloo on CPU, NCCL on CUDA.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_init: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Leave the group if this object joined it."""
        if self.owns_init and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_init = False


def process_group_from_env(device: str | torch.device | None, timeout_hours: float = 6.0) -> ProcessGroup:
    """Join the process group described by ``torchrun``'s environment, or a single process.

    ``device`` is the device the work runs on (``cuda``: NCCL, otherwise gloo). The timeout is
    generous because sharded commands meet only at start and at the end, after their whole shard.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return ProcessGroup()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dist = torch.distributed
    if dist.is_initialized():
        return ProcessGroup(dist.get_rank(), dist.get_world_size(), local_rank, owns_init=False)
    backend = "nccl" if torch.device(device or "cpu").type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device).index if torch.device(device).index is not None else local_rank)
    _import_dynamo()
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=timeout_hours))
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), local_rank, owns_init=True)


def _import_dynamo() -> None:
    """Import ``torch._dynamo`` before the group exists. Imported while a group is alive (the
    first optimizer step imports it), it keeps a reference to that group for good: the group's
    threads (gloo's) then outlive ``destroy_process_group`` and run into the interpreter's exit,
    which now and then aborts the process (SIGABRT) after all its work is done. Imported first,
    it has no group to keep, and ``close`` really ends the group."""
    try:
        import torch._dynamo  # noqa: F401
    except ImportError:  # a torch built without it has nothing to keep the group either
        pass
