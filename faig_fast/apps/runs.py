"""Joining and leaving the ``torchrun`` process group for ``faig attribute``; the sharded, resumable
run itself is the library's one loop (:func:`faig_fast.core.run_loop.run`)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group (gloo on CPU, nccl on GPU); (rank, world) or (0, 1)."""
    if "RANK" not in os.environ or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def finish_distributed(wait: bool = True) -> None:
    """Wait for every rank (unless this one failed), then leave the process group: a rank that
    exits while another still talks to it aborts gloo."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
