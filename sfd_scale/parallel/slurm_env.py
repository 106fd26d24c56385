"""SLURM's launch environment -> torch's ``env://`` variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

Under srun every task gets SLURM's variables but none of torch's; ``slurm_rendezvous()`` derives them
without any communication, and ``layout`` calls it before creating the process group (so does anything
that needs the rank before the layout exists). Pure functions of an environment mapping: testable on
plain dicts (tests/parallel/test_slurm_env.py; the real srun is in tests/slurm).
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, MutableMapping, Optional

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
