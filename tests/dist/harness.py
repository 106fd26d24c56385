"""The one multi-rank test harness: ``run_ranks(fn, world_size, args)`` spawns CPU ranks on gloo.

A thin alias of the library's local launcher (``sfd_scale.parallel.launch.run_local``), which the
benchmark tool uses too; ranks run one thread each since tests share 2 cores. ``fn(rank, world_size,
*args)`` must live at module level (spawned processes import it).
"""
from sfd_scale.parallel.launch import run_local


def run_ranks(fn, world_size: int, args=(), timeout: float = 300.0):
    return run_local(fn, world_size, args=args, timeout=timeout, threads_per_rank=1)
