"""Data-parallel fitting on ``torch.distributed``: statistics add, so merging ranks is an all-reduce.

Each rank collects :class:`~lensmat.stats.gram.GramStats` on its shard of the corpus (lines
``rank::world_size``); :func:`all_reduce_stats` sums ``n``, ``Σz`` and ``ΣzzᵀS`` across ranks in
float64 (gloo on CPU, NCCL with CUDA statistics); every rank then holds the statistics of the
whole corpus and solves the same maps; rank 0 writes them.

    torchrun --nproc_per_node=4 -m lensmat fit --out runs/maps      # or: lensmat fit --distributed
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from lensmat.stats.gram import GramStats


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1).

    Returns whether this process is part of a distributed run. The backend is NCCL when CUDA is
    available, else gloo.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def shutdown(barrier: bool = True) -> None:
    """Leave the process group: wait for every rank (``barrier``), then ``destroy_process_group``.

    Without the barrier a rank that finishes first tears its gloo threads down while a peer still
    writes to it, and the process can abort with ``terminate called without an active exception``.
    Pass ``barrier=False`` on an error path, where the other ranks may never reach it.
    """
    if is_distributed():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_stats(stats: list[GramStats]) -> list[GramStats]:
    """Sum every rank's statistics in place (a no-op outside a distributed run)."""
    if not is_distributed():
        return stats
    for st in stats:
        n = torch.tensor([float(st.n)], dtype=torch.float64, device=st.sum.device)
        for t in (n, st.sum, *st.panels):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        st.n = int(n.item())
    return stats
