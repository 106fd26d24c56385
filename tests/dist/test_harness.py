"""The harness itself: ranks see each other, failures surface with the rank's error."""
import pytest
import torch
import torch.distributed as dist

from tests.dist.harness import run_ranks


def _all_reduce(rank, world_size):
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise RuntimeError("rank one fails on purpose")
    return rank


def test_ranks_communicate():
    assert run_ranks(_all_reduce, 2) == [3.0, 3.0]


def test_rank_failure_is_reported():
    with pytest.raises(Exception, match="rank one fails on purpose"):
        run_ranks(_fail_on_rank_one, 2)
