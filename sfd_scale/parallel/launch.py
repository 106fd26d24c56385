"""Run a function on N local ranks (CPU + gloo, or one GPU each): tests, benchmarks, laptops.

    results = run_local(fn, world_size=2, args=(...))   # fn(rank, world_size, *args), at module level

Each rank gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, an initialised process group
(gloo on CPU, nccl with GPUs) and a TMPDIR private to the launch (shared by its ranks, as on a node: mosaicml-streaming's file locks
must be common to the ranks of a node); the group and megatron's parallel state are torn down
afterwards. A rank that fails raises here with its traceback; one that hangs past ``timeout`` is killed.
Clusters use torchrun / srun instead; this is the same environment, made locally. Under srun,
``slurm_rendezvous()`` derives it from SLURM's variables (``layout`` calls it before creating the group).
"""
from __future__ import annotations

import os
import pickle
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, MutableMapping, Optional, Sequence

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- SLURM
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 15000  # [15000, 30000): below Linux's ephemeral ports (32768+)


def expand_hostlist(hostlist: str) -> List[str]:
    """SLURM's compressed host list -> host names: ``"gpu[01-03,07],cpu-a[1-2]b"`` -> ``gpu01 gpu02 gpu03
    gpu07 cpu-a1b cpu-a2b`` (zero padding kept; several bracket groups in one name expand as a product)."""
    names: List[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", hostlist):
        expanded = [""]
        for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            options = [text]
            if ranges:
                options = []
                for part in ranges.split(","):
                    lo, _, hi = part.partition("-")
                    if not hi:
                        options.append(text + lo)
                    else:
                        width = len(lo)
                        options += [f"{text}{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
            expanded = [e + o for e in expanded for o in options]
        names += [e for e in expanded if e]
    return names


def expand_tasks_per_node(spec: str) -> List[int]:
    """``SLURM_TASKS_PER_NODE`` format -> one count per node: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: List[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot parse tasks per node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slurm_rendezvous(env: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """Inside an srun task (``SLURM_PROCID`` and a step id set) and without a launcher's ``RANK``: set
    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT from SLURM's variables, for
    ``init_process_group``'s ``env://``. Returns what it set ({} when it did nothing).

    - WORLD_SIZE counts the tasks of this step (``SLURM_STEP_NUM_TASKS``), not of the whole job.
    - MASTER_ADDR is the step's first host (task 0 runs there: srun's default block distribution).
    - MASTER_PORT is the job id mapped into [15000, 30000), so every task picks the same port without
      talking; a requeued job keeps its id and port. MASTER_ADDR / MASTER_PORT already set are kept.
    - The batch script itself (SLURM_PROCID=0 but no step: ``python`` run without ``srun``) is left alone:
      it is one process, whatever the job's task count.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env:
        return {}
    if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        return {}
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        counts = expand_tasks_per_node(per_node)
        local_world = counts[min(int(env.get("SLURM_NODEID", 0)), len(counts) - 1)]
    else:
        local_world = int(env.get("SLURM_NTASKS_PER_NODE") or world)
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodes and "MASTER_ADDR" not in env:
        raise RuntimeError("srun task without SLURM_STEP_NODELIST / SLURM_JOB_NODELIST: cannot pick MASTER_ADDR")
    update = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(world), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
              "LOCAL_WORLD_SIZE": str(local_world)}
    if "MASTER_ADDR" not in env:
        update["MASTER_ADDR"] = expand_hostlist(nodes)[0]
    if "MASTER_PORT" not in env:
        update["MASTER_PORT"] = str(SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", 0)) % SLURM_PORT_SPAN)
    env.update(update)
    return update


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
