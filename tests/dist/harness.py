"""The one multi-rank test harness: spawn N CPU ranks on gloo, run a function, collect its results.

    results = run_ranks(my_check, world_size=2, args=(...))   # my_check(rank, world_size, *args)

The function must live at module level (spawned processes import it). Each rank gets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT, an initialised gloo process group, and a private TMPDIR; the
group and megatron's parallel state are torn down afterwards. A rank that fails or hangs fails the test
with its traceback; nothing is left running.
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


def _entry(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: Sequence) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TMPDIR=os.path.join(out_dir, f"tmp{rank}"))
    os.makedirs(os.environ["TMPDIR"], exist_ok=True)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # ranks share 2 cores; oversubscription only slows every rank down
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(out_dir, f"result{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        from sfd_scale.parallel.layout import destroy

        destroy()


def run_ranks(fn: Callable, world_size: int, args: Sequence = (), timeout: float = 300.0) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results by rank."""
    with tempfile.TemporaryDirectory(prefix="sfd_dist_") as out_dir:
        ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), out_dir, tuple(args)),
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
