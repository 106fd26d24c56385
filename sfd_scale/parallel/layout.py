"""Process layout: TP x PP x DP over torch.distributed + megatron-core parallel_state.

TP = PP = DP = 1 is just one layout: a single process still gets a (one-rank, gloo) process group so
megatron's tensor-parallel layers run unchanged. Multi-rank layouts are initialised the same way from
the launcher's environment (torchrun / srun set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..config import check_layout_sizes
from . import cpu_compat
from .slurm_env import slurm_rendezvous


@dataclass(frozen=True)
class ParallelLayout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_stages: int = 1   # model chunks per pipeline rank (interleaved 1F1B when > 1)

    def check(self, world_size: int) -> None:
        tp, pp = self.tensor_parallel, self.pipeline_parallel
        check_layout_sizes(tp, pp, self.virtual_stages)
        if world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not divisible by parallel.tensor_parallel x "
                             f"parallel.pipeline_parallel = {tp} x {pp}")


def _init_process_group() -> None:
    if dist.is_initialized():
        return
    slurm_rendezvous()  # srun tasks: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_* from SLURM's variables
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():  # each rank on its own GPU before NCCL binds one
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group(backend)  # env:// from the launcher
    else:  # one process: an in-memory store, no port to pick or leak
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def initialize(layout: ParallelLayout = ParallelLayout()) -> None:
    """Create the process group (if needed) and megatron's TP / PP / DP groups for ``layout``.

    Without a GPU, megatron-core first gets its CPU redirections (``cpu_compat``): CPU + gloo is a
    supported way to run any layout, not only TP = PP = 1.
    """
    if not torch.cuda.is_available():
        cpu_compat.enable()
    _init_process_group()
    if parallel_state.model_parallel_is_initialized():
        current = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_pipeline_model_parallel_world_size())
        if current != (layout.tensor_parallel, layout.pipeline_parallel):
            raise RuntimeError(f"parallel state already initialised as TP x PP = {current}, asked for {layout}")
        return
    layout.check(dist.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_parallel, pipeline_model_parallel_size=layout.pipeline_parallel,
        virtual_pipeline_model_parallel_size=layout.virtual_stages if layout.virtual_stages > 1 else None,
        # DP outermost: the TP x PP ranks of one model replica are consecutive, which is what the
        # streaming loader's ``replication`` (same samples for consecutive ranks) needs.
        order="tp-pp-dp")


def ensure_initialized() -> None:
    """Single-process default: initialise TP = PP = 1 unless a layout was already set up."""
    if not parallel_state.model_parallel_is_initialized():
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError("torch.distributed runs with several ranks but no layout was set: call "
                               "sfd_scale.parallel.layout.initialize(ParallelLayout(...)) first")
        initialize(ParallelLayout())


def current_tensor_parallel() -> int:
    """The TP size of the layout this process runs in, 1 when none is set up: what a model built here (an
    autoguidance guide inside a TP run) passes to ``parallel_config``. Sets nothing up."""
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def _spans(ranks: List[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out, start = [], ranks[0]
    for prev, cur in zip(ranks, ranks[1:] + [None]):
        if cur is None or cur != prev + 1:
            out.append(f"{start}-{prev}" if prev > start else str(start))
            start = cur
    return ",".join(out)


def placement_line(max_listed: int = 8) -> str:
    """Where the ranks run and whether each tensor-parallel group stays on one host (its all-reduces run every
    layer: across hosts they would cross the network). Collective: every rank calls it; rank 0 logs it.
    E.g. ``ranks per host: node1 0-1, node2 2-3; tensor-parallel groups 0-1, 2-3: each within one host``."""
    tp_group = (dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group())
                if parallel_state.model_parallel_is_initialized() else [dist.get_rank()])
    everyone: List = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), sorted(tp_group)))
    hosts: Dict[str, List[int]] = {}
    for rank, (host, _) in enumerate(everyone):
        hosts.setdefault(host, []).append(rank)
    shown = [f"{host} {_spans(ranks)}" for host, ranks in list(hosts.items())[:max_listed]]
    more = f" ... ({len(hosts)} hosts)" if len(hosts) > max_listed else ""
    groups = sorted({tuple(group) for _, group in everyone})
    split = [g for g in groups if len({everyone[r][0] for r in g}) > 1]
    where = ("each within one host" if not split else
             f"{len(split)} of {len(groups)} span hosts (tensor-parallel traffic crosses the network: put "
             f"--ntasks-per-node at a multiple of parallel.tensor_parallel)")
    listed = ", ".join(_spans(list(g)) for g in groups[:max_listed]) + (" ..." if len(groups) > max_listed else "")
    return f"ranks per host: {', '.join(shown)}{more}; tensor-parallel groups {listed}: {where}"


def destroy() -> None:
    """Tear down megatron groups and the process group (tests, end of a run)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
