"""The one training micro-batch type, and the keyed draws that fill it.

    draws = TrainingDraws(seed, lognorm=..., label_dropout=..., null_label=...)
    batch = draws(step, x1, label, index, repa_target)     # -> MicroBatch, on x1's device
    terms = objective(model, batch)                         # SFDObjective.__call__: loss terms, 'total'

A ``MicroBatch`` is what the objective consumes: clean latents, (dropped) labels and the sample's random
draw pinned (base time, noise), plus the REPA target when the model aligns one. Every engine gets a list
of them, pipelined or not, and every pipeline stage sees the same draw because it travels with the batch.
It lives here, next to the objective, so that ``parallel/`` (engines, pipeline schedules) and ``train/``
(the trainer) both import it from below.

The draws of a step are a pure function of (train.seed, step, sample index) (``keyed_noise.py``): a
resumed run and every layout draw the same values for the same sample. Label dropout is drawn here for
the whole global batch, not inside the model from a per-rank RNG, so every layout drops the same labels.
The SFD math that turns a draw into a network input stays in ``sfd.py``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from .keyed_noise import keyed_draws


@dataclass
class MicroBatch:
    """One batch of training samples with its random draw pinned (the same on every pipeline stage).

    ``x1`` (B, C, H, W) clean latents; ``y`` (B,) class labels, dropped ones set to the null class;
    ``t_base`` (B,) float32 base times in [0, 1] (``sfd.SFDObjective.times`` maps them to model times);
    ``x0`` (B, C, H, W) noise in ``x1``'s dtype; ``repa_target`` stored REPA features (float32) or None.
    """

    x1: torch.Tensor
    y: torch.Tensor
    t_base: torch.Tensor
    x0: torch.Tensor
    repa_target: Optional[torch.Tensor] = None

    @property
    def size(self) -> int:
        return self.x1.shape[0]

    def rows(self, start: int, stop: int) -> "MicroBatch":
        """Samples ``start:stop`` of every field (views, no copy)."""
        def cut(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t[start:stop]

        return MicroBatch(**{f.name: cut(getattr(self, f.name)) for f in dataclasses.fields(self)})


class TrainingDraws:
    """The per-step random inputs of training: base time, noise and label dropout, keyed by
    (``seed``, step, sample index). ``lognorm``: logit-normal base times (``ObjectiveConfig.use_lognorm``),
    else uniform; a label is replaced by ``null_label`` (the model's extra class) with probability
    ``label_dropout``."""

    def __init__(self, seed: int, *, lognorm: bool, label_dropout: float, null_label: int):
        self.seed, self.lognorm, self.label_dropout, self.null_label = seed, lognorm, label_dropout, null_label

    def __call__(self, step: int, x1: torch.Tensor, label: torch.Tensor, index: torch.Tensor,
                 repa_target: Optional[torch.Tensor] = None) -> MicroBatch:
        """The micro-batch of samples ``index`` at ``step``; the draws are made on ``index``'s device."""
        t_base, x0, drop = keyed_draws(self.seed, step, index, tuple(x1.shape[1:]), lognorm=self.lognorm,
                                       dropout=self.label_dropout)
        y = torch.where(drop, torch.full_like(label, self.null_label), label)
        return MicroBatch(x1=x1, y=y, t_base=t_base, x0=x0.to(x1.dtype), repa_target=repa_target)
