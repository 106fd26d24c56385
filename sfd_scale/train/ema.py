"""Exponential moving average of the trainable weights, kept in fp32: whole on every rank (``EMA``) or
sharded over data-parallel ranks with the optimizer's fp32 master weights (``ShardedEMA``).

ema <- decay * ema + (1 - decay) * param after every optimizer step, starting as an exact copy (the
official recipe). Frozen parameters (the sin-cos pos_embed) and buffers (RoPE tables) are copied, not
averaged.

Sources: the trainer passes ``engine.ema_sources()``. Whole EMA: one tensor per trainable parameter, the
engine's fp32 master copy where this rank holds it whole (plain engine: the fp32 parameters; megatron's
non-distributed bf16 optimizer: its ``fp32_from_float16`` groups), so a bf16 run averages the fp32 weights
Adam updates, with no per-step casts; where the masters are sharded over data-parallel ranks and the EMA is
not (``parallel.shard_ema=false``), the bf16 parameters, cast per step. Sharded EMA: this rank's pieces of the
fp32 masters (``base.MasterPiece``: megatron's distributed-optimizer shards, ZeRO's fp32 partitions), so each
rank keeps 4 bytes per parameter / DP instead of 4 and a bf16 run averages the fp32 masters.

One fused multi-tensor op per step (``torch._foreach_lerp_``), with a skipped step folded into the weight on
the device: weight = (1 - decay) * (1 - nonfinite), so a step the engine skipped leaves the EMA exactly as
it was (lerp with weight 0 is ``ema + 0 * (p - ema)``) and the host never reads the flag. The op is
elementwise: on pieces of the masters it computes exactly what it computes on the whole tensors (the sharded
EMA equals the whole one bit for bit where both follow the same fp32 values: ``tests/dist/test_sharded_ema.py``).

Both classes give the full EMA weights the same way, so sampling, FID and checkpoints do not care which one
runs: ``full_model()`` (sampling, FID), ``full_chunks()`` (a checkpoint save), ``loading_chunks()`` (a
checkpoint load). The sharded EMA materialises a full fp32 module for the duration (a collective over DP:
every element is held by one rank, gathered by an integer all-reduce of the fp32 bits, exact) and keeps only
its pieces again afterwards; between those steps no full copy exists.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..parallel.engines.base import MasterPiece


def _chunks(model: nn.Module) -> List[nn.Module]:
    """A model's pipeline chunks (an ``nn.ModuleList`` of them), or the model itself."""
    return list(model) if isinstance(model, nn.ModuleList) else [model]


@torch.no_grad()
def _lerp(ema: List[torch.Tensor], sources: Sequence[torch.Tensor], decay: float,
          skip: Optional[torch.Tensor]) -> None:
    """ema <- lerp(ema, source, 1 - decay), in place, one fused op; weight 0 where ``skip`` is 1."""
    if len(sources) != len(ema):
        raise ValueError(f"EMA update got {len(sources)} source tensors for {len(ema)} EMA tensors")
    src = [s.detach().float() for s in sources]  # no copy of an fp32 source
    if skip is None:
        torch._foreach_lerp_(ema, src, 1.0 - decay)
        return
    weight = (1.0 - skip.to(torch.float32)) * (1.0 - decay)
    # weights as a list of 0-dim tensors: one value for every pair, read on the device
    torch._foreach_lerp_(ema, src, [weight] * len(ema))


class EMA:
    """The whole EMA on every rank: a full fp32 model of its own (``model``)."""

    sharded = False

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
        _lerp([e for e, _ in self._pairs], [p for _, p in self._pairs] if sources is None else sources,
              self.decay, skip)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)

    @contextlib.contextmanager
    def full_model(self) -> Iterator[nn.Module]:
        """The EMA model with its full weights (sampling, FID)."""
        yield self.model

    @contextlib.contextmanager
    def full_chunks(self) -> Iterator[List[nn.Module]]:
        """The EMA's model chunks with their full weights (a checkpoint save reads them)."""
        yield _chunks(self.model)

    @contextlib.contextmanager
    def loading_chunks(self) -> Iterator[List[nn.Module]]:
        """Model chunks to load full EMA weights into (a checkpoint load); the EMA continues from them."""
        yield _chunks(self.model)


def frozen_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of what the EMA copies rather than averages: frozen parameters and buffers (floating ones in
    fp32, as ``EMA``'s ``.float()`` copy has them)."""
    out = {}
    for name, t in [*((n, p) for n, p in model.named_parameters() if not p.requires_grad), *model.named_buffers()]:
        t = t.detach().clone()
        out[name] = t.float() if t.is_floating_point() else t
    return out


class ShardedEMA:
    """The EMA of this rank's pieces of the fp32 master weights (module docstring).

    ``skeleton()``: a new model of the training model's structure (same parameter names and order) on the meta
    device, for materialising; ``pieces``: ``engine.master_pieces()`` (copied: the EMA starts at the masters);
    ``group``: the process group over which the pieces cover every parameter once; ``frozen``:
    ``frozen_state`` of the training model (gathered, under ZeRO-3)."""

    sharded = True

    def __init__(self, skeleton: Callable[[], nn.Module], pieces: Sequence[MasterPiece], group,
                 frozen: Dict[str, torch.Tensor], decay: float, device: torch.device):
        self.decay, self.group, self.device, self._skeleton = decay, group, torch.device(device), skeleton
        self.frozen = dict(frozen)
        self.trainable = [name for name, p in skeleton().named_parameters() if p.requires_grad]
        self.places = [(piece.index, piece.start) for piece in pieces]
        self.shards = [piece.tensor.detach().float().clone() for piece in pieces]
        if any(not 0 <= i < len(self.trainable) for i, _ in self.places):
            raise ValueError(f"master pieces name parameters beyond the model's {len(self.trainable)} trainable ones")

    @torch.no_grad()
    def update(self, sources: Sequence[torch.Tensor], skip: Optional[torch.Tensor] = None) -> None:
        """One EMA step toward ``sources`` (the live tensors of the pieces, in order)."""
        _lerp(self.shards, sources, self.decay, skip)

    def _empty_model(self) -> nn.Module:
        """A new fp32 model on the device: frozen parameters and buffers filled, trainable ones uninitialised."""
        model = self._skeleton().to_empty(device=self.device).float().eval()
        own = dict(model.named_parameters()) | dict(model.named_buffers())
        with torch.no_grad():
            for name, value in self.frozen.items():
                own[name].copy_(value)
        return model

    def _trainable(self, model: nn.Module) -> List[torch.Tensor]:
        own = dict(model.named_parameters())
        return [own[name] for name in self.trainable]

    @torch.no_grad()
    def _gathered_model(self) -> nn.Module:
        """Collective over ``group``: the full EMA as a model. Each element lies in one rank's pieces: the others
        add zero bits, so an integer sum of the fp32 bit patterns is the value itself (signed zeros and all)."""
        model = self._empty_model()
        params = self._trainable(model)
        mine: Dict[int, list] = {}
        for (index, start), shard in zip(self.places, self.shards):
            mine.setdefault(index, []).append((start, shard))
        for index, p in enumerate(params):
            flat = p.data.view(-1)
            flat.zero_()
            for start, shard in mine.get(index, []):
                flat[start:start + shard.numel()].copy_(shard)
            if dist.is_initialized():
                dist.all_reduce(flat.view(torch.int32), group=self.group)
        return model.requires_grad_(False)

    @contextlib.contextmanager
    def full_model(self) -> Iterator[nn.Module]:
        """Collective: the EMA model with its full weights, materialised for the duration."""
        yield self._gathered_model()

    @contextlib.contextmanager
    def full_chunks(self) -> Iterator[List[nn.Module]]:
        """Collective: the EMA's model chunks with their full weights, materialised for the duration."""
        yield _chunks(self._gathered_model())

    @contextlib.contextmanager
    def loading_chunks(self) -> Iterator[List[nn.Module]]:
        """Model chunks to load full EMA weights into; on leaving (without an error) this rank keeps its pieces
        of them, and their frozen parameters and buffers."""
        model = self._empty_model()
        yield _chunks(model)
        params = self._trainable(model)
        with torch.no_grad():
            for (index, start), shard in zip(self.places, self.shards):
                shard.copy_(params[index].detach().reshape(-1)[start:start + shard.numel()])
        self.frozen = frozen_state(model)
