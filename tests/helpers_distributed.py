"""Workers for tests/test_distributed.py: spawned processes import them from here."""

import time

import torch
import torch.distributed as dist


def all_reduce_ranks(rank, world_size):
    value = torch.tensor([float(rank)])
    dist.all_reduce(value)
    return {
        "rank": dist.get_rank(),
        "sum": value.item(),
        "backend": dist.get_backend(),
        "threads": torch.get_num_threads(),
        "tensor": torch.arange(3.0) + rank,
    }


def all_reduce_sum(rank, world_size):
    value = torch.tensor([float(rank)])
    dist.all_reduce(value)
    return value.item()


def fail_on_rank_one(rank, world_size):
    if rank == 1:
        return 1 / 0
    time.sleep(30)  # stopped by the launcher long before this ends
    return rank


def lonely_receive(rank, world_size):
    if rank == 1:
        buffer = torch.zeros(1)
        dist.recv(buffer, src=0)
    else:
        time.sleep(30)
    return rank


def CONSTANT_SOURCE():  # noqa: N802 - redefined by a test, as a notebook cell would
    return 0


_original_constant = CONSTANT_SOURCE


def report_constant(rank, world_size):
    return CONSTANT_SOURCE()
