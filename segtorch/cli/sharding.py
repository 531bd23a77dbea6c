"""``segtorch eval`` and ``segtorch predict`` under torchrun: each process takes a disjoint share of the work.

torchrun starts the processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their
environment; ``join`` makes them one torch.distributed group (gloo on the CPU, NCCL on GPUs, one GPU per local
rank). Without torchrun (or with one process) nothing is set up and the command runs as one process.
"""
from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1
    device: str | None = None  # the device this process computes on (cuda:LOCAL_RANK under torchrun on GPUs)

    @property
    def leader(self) -> bool:
        """The process that prints and writes the reports."""
        return self.rank == 0

    def take(self, items: list) -> list:
        """This process's share: every world_size-th item from its rank (disjoint, together all of them)."""
        return items[self.rank::self.world_size]


def join(device: str | None) -> Shard:
    """This process's place among those torchrun started (after ``device`` was checked): one process when
    ``WORLD_SIZE`` is unset or 1. Under torchrun on GPUs each process takes the GPU of its ``LOCAL_RANK``
    (``device`` cuda or unset; ``cuda:N`` is kept as given)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard(device=device)
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda":
        if torch.device(device).index is None:
            device = f"cuda:{local}"
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return Shard(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def sum_over_processes(shard: Shard, values: list[int]) -> list[int]:
    """``values`` summed over the processes (every process gets the sums); as they are for one process."""
    if shard.world_size == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    counts = torch.tensor(values, dtype=torch.int64)
    if dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
        counts = counts.cuda()
    dist.all_reduce(counts)
    return [int(v) for v in counts.cpu()]


def leave(shard: Shard) -> None:
    """Leave the group ``join`` made (a no-op for one process)."""
    if shard.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
