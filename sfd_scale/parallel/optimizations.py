"""Speed options applied to a built model, kept out of the model definition (as torchtitan's parallelize
step): each is a config switch with a CPU test of its numerical equivalence
(``tests/parallel/test_optimizations.py``).

* ``train.activation_checkpointing``: every block keeps only its input and recomputes its activations in
  the backward (``torch.utils.checkpoint``, non-reentrant): less activation memory for ~1/3 more compute.
* ``train.compile`` (default: on when training on CUDA, see ``compile_enabled``): ``torch.compile`` in place
  (``nn.Module.compile``, so parameter names and state dicts stay those of the eager model) of every module
  that runs on the full token tensor: each transformer block, the final layer and the REPA projector. The
  training forward has no graph break (``tests/models/test_lightningdit.py``), so the whole model could be
  one graph; per module is chosen because the blocks share one compiled graph (parameters are graph
  inputs), so compile time does not grow with depth (measured on CPU, 1 thread, hidden 96, depth 8: first
  step 6.4 s compiled per module vs 53 s as one whole-model graph; later steps equal within noise, 217 vs
  213 ms), and pipeline stages need nothing special. What stays eager works on (B, D)-sized tensors: the
  time / label embedders. Applied to the training model only: the EMA copy, used for sampling, stays eager.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch
import torch.nn as nn

from ..models.lightningdit import LightningDiT


def apply_activation_checkpointing(chunks: Iterable[LightningDiT], enabled: bool = True) -> None:
    for chunk in chunks:
        chunk.checkpoint_blocks = enabled


def compile_enabled(setting: Optional[bool], device: torch.device) -> bool:
    """``train.compile`` resolved for the training device: None = on exactly when it is CUDA."""
    return torch.device(device).type == "cuda" if setting is None else bool(setting)


# the modules compiled besides the blocks, by attribute name (a chunk holds them when its pipeline stage does)
COMPILED_HEADS = ("final_layer", "repa_projector")


def compiled_modules(chunk: LightningDiT) -> List[nn.Module]:
    """What ``apply_compile`` compiles in one model chunk (each block; final layer and REPA projector if held)."""
    extra = [getattr(chunk, name, None) for name in COMPILED_HEADS]
    return [*chunk.blocks, *(m for m in extra if m is not None)]


def _contiguous_tokens(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def apply_compile(chunks: Iterable[LightningDiT]) -> None:
    for chunk in chunks:
        on_cpu = next(chunk.parameters()).device.type == "cpu"
        for module in compiled_modules(chunk):
            if on_cpu:
                # Why: inductor's vectorized C++ code (torch 2.14) gives NaN gradients for a bf16-autocast block
                # whose token input is strided, as the patch embedding's transposed output is (a CPU-only fault:
                # with vectorization off the gradients are right). Inside the compiled graph the copy is one
                # more read and write of the tokens; fp32 values do not change.
                module.register_forward_pre_hook(_contiguous_tokens)
            module.compile()
