"""Run a function on N local ranks (CPU + gloo, or one GPU each): tests, benchmarks, laptops.

    results = run_local(fn, world_size=2, args=(...))   # fn(rank, world_size, *args), at module level

Each rank gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, an initialised process group
(gloo on CPU, nccl with GPUs) and a TMPDIR private to the launch (shared by its ranks, as on a node:
mosaicml-streaming's file locks must be common to the ranks of a node); the group and megatron's parallel state are torn
down afterwards. A rank that fails raises here with its traceback; one that hangs past ``timeout`` is killed.
Clusters use torchrun / srun instead; this is the same environment, made locally (under srun,
``slurm_env.slurm_rendezvous()`` derives it from SLURM's variables).
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, List, Sequence

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: Sequence,
           threads: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TMPDIR=os.path.join(out_dir, "tmp"),
                      LOCAL_WORLD_SIZE=str(world_size))
    os.makedirs(os.environ["TMPDIR"], exist_ok=True)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(out_dir, f"result{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        # imported here: a spawned rank imports this module before _entry sets its environment (TMPDIR)
        from .layout import destroy

        destroy()


def run_local(fn: Callable, world_size: int, args: Sequence = (), timeout: float = 600.0,
              threads_per_rank: int = 1) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; their results by rank.

    The rendezvous port is picked free in this process but bound seconds later by rank 0 (after its
    imports); when something else took it meanwhile (EADDRINUSE, before ``fn`` ran), launch again."""
    for attempt in range(4):
        try:
            return _run_once(fn, world_size, args, timeout, threads_per_rank)
        except mp.ProcessRaisedException as err:
            if "EADDRINUSE" not in str(err) or attempt == 3:
                raise


def _run_once(fn: Callable, world_size: int, args: Sequence, timeout: float, threads_per_rank: int) -> List[Any]:
    with tempfile.TemporaryDirectory(prefix="sfd_ranks_") as out_dir:
        ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), out_dir, tuple(args), threads_per_rank),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout:.0f}s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world_size):
            path = Path(out_dir) / f"result{rank}.pkl"
            results.append(pickle.loads(path.read_bytes()) if path.exists() else None)
        return results
