"""Data-parallel training engines: one small interface (``base.Engine``), three implementations, one factory.

    engine = build_engine(model, cfg)                     # picks cfg.parallel.engine: plain | megatron | deepspeed
    metrics = engine.train_step(micro_batches, objective)  # objective(engine.model, micro_batch) -> loss terms

* ``plain`` (``plain.py``): one process, torch AdamW (fused where supported), LambdaLR linear warmup,
  ``clip_grad_norm_`` - exactly the single-process trainer's arithmetic.
* ``megatron`` (``megatron.py``): megatron-core DDP (contiguous grad buffers, optional overlapped
  reduce, optional distributed optimizer) + megatron's optimizer, with our fix of its
  DistributedOptimizer reload bug; pipeline stages through megatron's schedules.
* ``deepspeed`` (``deepspeed.py``): ZeRO stage 1 / 2 / 3.

``base.py`` holds what they share (interface, batch layout, non-finite skip, layout-free optimizer state) and
imports none of them; megatron-core's and DeepSpeed's engines are imported only when asked for.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ...config import Config, ConfigError, require_package
from .base import Engine
from .plain import PlainEngine

ENGINES = ("plain", "megatron", "deepspeed")


def check_installed(name: str) -> None:
    """ConfigError (one line naming the pip extra) when engine ``name`` needs a library that is not installed:
    DeepSpeed is an extra (``sfd_scale[deepspeed]``); megatron-core is in the base install. The trainer calls
    this before it builds the model, ``build_engine`` again before importing the engine."""
    if name == "deepspeed":
        require_package("deepspeed", "parallel.engine=deepspeed needs DeepSpeed: pip install 'sfd_scale[deepspeed]'")


def build_engine(model: torch.nn.Module, cfg: Config) -> Engine:
    """The engine named by ``cfg.parallel.engine`` around ``model``: built identically (same seed) on every
    rank and already on its device; megatron's parallel state (``layout.initialize``) set up."""
    name = cfg.parallel.engine
    world = dist.get_world_size() if dist.is_initialized() else 1
    if name == "plain":
        if world > 1:
            raise ConfigError(f"parallel.engine='plain' runs in one process, but the world size is {world}: "
                              f"use 'megatron' or 'deepspeed'")
        return PlainEngine(model, cfg)
    if name == "megatron":
        from .megatron import MegatronEngine

        return MegatronEngine(model, cfg)
    if name == "deepspeed":
        check_installed(name)
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg)
    raise ConfigError(f"parallel.engine must be one of {ENGINES}, got {name!r}")
