"""Speed options applied to a built model, kept out of the model definition (as torchtitan's parallelize
step): each is a config switch, off by default, with a CPU test of its numerical equivalence
(``tests/parallel/test_optimizations.py``).

* ``train.activation_checkpointing``: every block keeps only its input and recomputes its activations in
  the backward (``torch.utils.checkpoint``, non-reentrant): less activation memory for ~1/3 more compute.
* ``train.compile``: ``torch.compile`` of every transformer block, in place (``nn.Module.compile``), so
  parameter names and state dicts stay those of the eager model. Applied to the training model only:
  the EMA copy, used for sampling, stays eager.
"""
from __future__ import annotations

from typing import Iterable

from ..models.lightningdit import LightningDiT


def apply_activation_checkpointing(chunks: Iterable[LightningDiT], enabled: bool = True) -> None:
    for chunk in chunks:
        chunk.checkpoint_blocks = enabled


def apply_compile(chunks: Iterable[LightningDiT]) -> None:
    for chunk in chunks:
        for block in chunk.blocks:
            block.compile()
