"""Multi-process training with ``torchrun``: process setup, the feature gather of the contrastive
loss (every process scores its items against the whole global batch), and keeping processes in
step when some of their images could not be read (batches of different sizes)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

from e2_core.runtime import resolve_device


@dataclass
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Context:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context(0, 1, resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return Context(rank, world_size, resolved)


def batch_sizes(size: int, skipped: Sequence[str], ctx: Context) -> Tuple[List[int], List[str]]:
    """Every process's batch size, and every process's skipped-image messages (one collective
    when nothing was skipped anywhere)."""
    if not ctx.distributed:
        return [size], list(skipped)
    device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    local = torch.tensor([size, len(skipped)], device=device)
    parts = [torch.zeros_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local)
    sizes = [int(p[0]) for p in parts]
    if not any(int(p[1]) for p in parts):
        return sizes, []
    messages: List[List[str]] = [[] for _ in range(ctx.world_size)]
    dist.all_gather_object(messages, list(skipped))
    return sizes, [m for ms in messages for m in ms]


def gather(tensor: torch.Tensor, ctx: Context, sizes: Sequence[int] = ()) -> torch.Tensor:
    """All processes' tensors concatenated along dim 0 (``sizes``: each process's length, when they
    differ); gradients flow back to their owners."""
    if not ctx.distributed:
        return tensor
    from torch.distributed.nn.functional import all_gather

    longest = max(sizes) if sizes else tensor.shape[0]
    if tensor.shape[0] < longest:  # all_gather needs equal shapes: pad, then cut the padding off
        pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, pad])
    parts = all_gather(tensor.contiguous())
    if sizes:
        parts = [part[:n] for part, n in zip(parts, sizes)]
    return torch.cat(parts, dim=0)


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
