"""Bodies that exercise the worker pool itself."""

import os

import torch.distributed as dist


def hash_seed(rank: int, world_size: int) -> str:
    return os.environ.get("PYTHONHASHSEED", "")


def one_rank_raises(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("bad input on rank 1")
    dist.barrier()  # rank 0 waits for rank 1, which never comes
    return rank


def sum_ranks(rank: int, world_size: int) -> int:
    import torch

    t = torch.tensor([rank])
    dist.all_reduce(t)
    return int(t.item())
