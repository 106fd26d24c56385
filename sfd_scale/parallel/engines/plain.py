"""The one-process engine: torch AdamW (fused where supported), LambdaLR linear warmup, ``clip_grad_norm_``;
micro-batches accumulated - exactly the single-process trainer's arithmetic."""
from __future__ import annotations

from typing import Sequence

import torch

from ...config import Config
from ...diffusion.micro_batch import MicroBatch
from .base import (ADAM_KINDS, Engine, Objective, adam_state, fused_adamw, lambda_lr_at, micro_batch_layout,
                   nonfinite_flag, skip_unless_finite, warmup_factor)


class PlainEngine(Engine):
    """One process: the trainer's own optimizer, schedule and clipping, micro-batches accumulated."""

    name = "plain"

    def __init__(self, model: torch.nn.Module, cfg: Config):
        self.model = self.module = model
        self.cfg, self.notes = cfg, []
        self.micro_batch_size, self.num_micro_batches = micro_batch_layout(cfg, 1)
        o = cfg.optim
        device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr,
                                           betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                                           fused=fused_adamw(cfg, device))
        warmup = max(o.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: warmup_factor(s, warmup))

    def train_step(self, micro_batches: Sequence[MicroBatch], objective: Objective) -> dict:
        n = self._check_micro_batches(micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for mb in micro_batches:
            terms = self._loss(objective, mb)
            loss = terms["total"]
            (loss if n == 1 else loss / n).backward()
            losses.append(terms)
        means = self._mean_losses(losses)
        mean = means["total"]
        clip = self.cfg.optim.grad_clip
        params = [p for p in self.module.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0 else None
        nonfinite = nonfinite_flag(mean, grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        skip_unless_finite([self.optimizer], nonfinite, self.optimizer.step)
        self.scheduler.step()
        self._count_nonfinite(nonfinite)
        return self._step_metrics(means, grad_norm, lr, nonfinite)

    def torch_optimizers(self) -> list:
        return [self.optimizer]

    def state_dict(self) -> dict:
        steps = self.scheduler.last_epoch
        skipped = self.nonfinite_steps()
        params = {name: {k: self.optimizer.state[p][k].detach().clone() for k in ADAM_KINDS}
                  for name, p in self.module.named_parameters() if p.requires_grad} if steps > skipped else {}
        return {"params": [params], "counters": {"optimizer_steps": steps, "nonfinite_steps": skipped}}

    def load_state_dict(self, state: dict) -> None:
        steps = state["counters"]["optimizer_steps"]
        adam_steps = steps - self._restore_nonfinite(state["counters"])
        if adam_steps:
            saved = state["params"][0]
            for name, p in self.module.named_parameters():
                if p.requires_grad:
                    own = adam_state(self.optimizer, p, adam_steps)
                    for k in ADAM_KINDS:
                        own[k].copy_(saved[name][k])
        lambda_lr_at(self.scheduler, steps)
