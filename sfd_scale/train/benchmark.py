"""Step-time benchmark of training layouts (TP x DP, engine) with the real trainer, on local ranks.

Each layout runs ``Trainer.train_step`` on the built-in digits latents for ``warmup + steps`` steps and
reports the mean wall time of the timed steps (rank 0's clock, after a barrier per step, so the slowest
rank decides). Speed goals live here and in the results files, never in tests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Sequence

import torch.distributed as dist

from ..config import load_config
from ..parallel.launch import run_local


@dataclass
class Layout:
    name: str
    world_size: int
    overrides: Sequence[str]


DEFAULT_LAYOUTS = [
    Layout("1 process, plain engine", 1, ["parallel.engine=plain"]),
    Layout("1 process, megatron engine", 1, ["parallel.engine=megatron"]),
    Layout("DP=2 megatron, distributed optimizer", 2, ["parallel.engine=megatron"]),
    Layout("DP=2 deepspeed ZeRO-2", 2, ["parallel.engine=deepspeed", "parallel.zero_stage=2"]),
    Layout("TP=2 megatron", 2, ["parallel.engine=megatron", "parallel.tensor_parallel=2"]),
    Layout("PP=2 megatron, 2 micro-batches", 2, ["parallel.engine=megatron", "parallel.pipeline_parallel=2",
                                                 "train.micro_batch_size=16"]),
]


def _time_steps(rank: int, world_size: int, config_files: List[str], overrides: List[str], steps: int,
                warmup: int) -> dict:
    from .trainer import Trainer

    trainer = Trainer(load_config(config_files, overrides))
    batches = iter(trainer.loader())
    times = []
    for i in range(warmup + steps):
        batch = next(batches)
        dist.barrier()
        t0 = time.perf_counter()
        trainer.train_step(batch)
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"step_s": sum(times) / len(times), "global_batch": trainer.cfg.train.global_batch_size}


def benchmark(layouts: Sequence[Layout], config_files: Sequence[str], overrides: Sequence[str], steps: int = 10,
              warmup: int = 3, threads_per_rank: int = 1) -> List[dict]:
    rows = []
    for layout in layouts:
        result = run_local(_time_steps, layout.world_size, threads_per_rank=threads_per_rank,
                           args=(list(config_files), list(overrides) + list(layout.overrides), steps, warmup))[0]
        rows.append({"layout": layout.name, "ranks": layout.world_size, "step_ms": 1000 * result["step_s"],
                     "samples_per_s": result["global_batch"] / result["step_s"]})
    return rows


def markdown(rows: List[dict], header: str) -> str:
    lines = [header, "", "| layout | ranks | ms / step | samples / s |", "|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['ranks']} | {r['step_ms']:.1f} | {r['samples_per_s']:.1f} |" for r in rows]
    return "\n".join(lines) + "\n"
