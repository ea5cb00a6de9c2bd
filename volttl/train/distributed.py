"""One process or many: what `torchrun` sets up, in one place.

``torchrun --nproc_per_node N -m volttl train ...`` starts N processes with RANK,
WORLD_SIZE and LOCAL_RANK in the environment. Each process trains a
DistributedDataParallel replica on its share of the windows (gradients are averaged,
buffers broadcast from rank 0, so every rank holds the same weights). NCCL on GPUs,
gloo on CPUs. Without those variables everything below is a no-op on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from volttl.numerics import resolve_device


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this context started the process group, so it ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def gather(self, obj):
        """Every rank's ``obj``, in rank order (a one-item list on one process)."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        return sum(self.gather(value)) / self.world

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's BatchNorm running statistics everywhere. DDP broadcasts buffers at the
        start of each training forward, so after the last one every rank holds statistics
        updated from its own shard; this makes the replicas identical again."""
        if self.active:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device_name: str) -> DistContext:
    """The process's rank, world size and device, starting the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return DistContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world=world, device=device, owns_group=owns)
