"""Exponential moving average of the trainable weights, kept in fp32.

ema <- decay * ema + (1 - decay) * param after every optimizer step, starting as an exact copy (the
official recipe). Frozen parameters (the sin-cos pos_embed) and buffers (RoPE tables) are copied, not
averaged. The EMA is a full model of its own, so sampling and export use it like any model.

Sources: the trainer passes ``engine.ema_sources()``, one tensor per trainable parameter: the engine's fp32
master copy where this rank holds it whole (plain engine: the fp32 parameters; megatron's non-distributed
bf16 optimizer: its ``fp32_from_float16`` groups), so a bf16 run averages the fp32 weights Adam updates,
with no per-step casts. Where the masters are sharded over data-parallel ranks (megatron's distributed
optimizer, ZeRO) the sources are the bf16 parameters, cast per step (a sharded EMA would avoid that).

One fused multi-tensor op per step (``torch._foreach_lerp_``), with a skipped step folded into the weight on
the device: weight = (1 - decay) * (1 - nonfinite), so a step the engine skipped leaves the EMA exactly as
it was (lerp with weight 0 is ``ema + 0 * (p - ema)``) and the host never reads the flag.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        # Process groups held by megatron layers cannot be copied: share them (memo maps them to themselves).
        groups = {id(v): v for m in model.modules() for v in vars(m).values()
                  if isinstance(v, torch.distributed.ProcessGroup)}
        self.model = copy.deepcopy(model, memo=groups).float().eval().requires_grad_(False)
        self._pairs = [(e, p) for (_, e), (_, p) in zip(self.model.named_parameters(), model.named_parameters())
                       if p.requires_grad]

    @torch.no_grad()
    def update(self, sources: Optional[Sequence[torch.Tensor]] = None, skip: Optional[torch.Tensor] = None) -> None:
        """One EMA step toward ``sources`` (aligned with the model's trainable parameters; default: the model's
        own parameters). ``skip``: a 0-dim device flag, 1 = the optimizer step was skipped (EMA unchanged)."""
        ema = [e for e, _ in self._pairs]
        if sources is None:
            sources = [p for _, p in self._pairs]
        if len(sources) != len(ema):
            raise ValueError(f"EMA update got {len(sources)} source tensors for {len(ema)} trainable parameters")
        src = [s.detach().float() for s in sources]  # no copy of an fp32 source
        if skip is None:
            torch._foreach_lerp_(ema, src, 1.0 - self.decay)
            return
        weight = (1.0 - skip.to(torch.float32)) * (1.0 - self.decay)
        # weights as a list of 0-dim tensors: one value for every pair, read on the device
        torch._foreach_lerp_(ema, src, [weight] * len(ema))

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
