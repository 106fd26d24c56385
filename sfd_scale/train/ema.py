"""Exponential moving average of the trainable weights, kept in fp32.

ema <- decay * ema + (1 - decay) * param after every optimizer step, starting as an exact copy (the
official recipe). Frozen parameters (the sin-cos pos_embed) and buffers (RoPE tables) are copied, not
averaged. The EMA is a full model of its own, so sampling and export use it like any model.
"""
from __future__ import annotations

import copy

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
    def update(self) -> None:
        ema = [e for e, _ in self._pairs]
        src = [p.detach().float() for _, p in self._pairs]
        torch._foreach_lerp_(ema, src, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
