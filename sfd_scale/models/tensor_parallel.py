"""Tensor-parallel sharding of full (official-layout) LightningDiT state dicts, and the way back.

This is the model's own parameter layout under TP, so it lives in ``models`` (``official.py`` loads and
exports through it); ``sfd_scale/parallel`` only decides the layout (which ranks form a TP group).

Every rank of a TP group holds a *local shard* of each megatron linear (``models/layers.py``); the
official checkpoint holds full tensors. The rules below say, per official key, how a full tensor maps to
rank r's shard; everything not listed is replicated (embedders, norms, biases added after an all-reduce,
the REPA projector, pos_embed, RoPE tables).

============================================  =====  ==================================================
key (blocks.i. / final_layer.)                dim    rank r's shard
============================================  =====  ==================================================
attn.qkv.weight / .bias                       0      rows viewed (3, heads, head_dim): heads of rank r
                                                     from q, k and v -> local [q_r | k_r | v_r]
attn.proj.weight                              1      input columns of rank r's heads
mlp.w12.weight / .bias (SwiGLU)               0      rows viewed (2, hidden): [a_r | b_r]
mlp.w3.weight, mlp.fc2.weight                 1      contiguous input columns
mlp.fc1.weight / .bias (GELU MLP)             0      contiguous rows
adaLN_modulation.1.*, final_layer.linear.*    0      contiguous rows (column-parallel, output gathered
                                                     in rank order, so a plain split is the inverse)
============================================  =====  ==================================================

A rule's ``stride`` is megatron's ``partition_stride``: the dimension is ``stride`` independent blocks,
each split over the ranks on its own (block g of rank r = part r of block g). tests/models/test_tensor_parallel.py
checks that the table agrees with the tensor-parallel attributes megatron puts on the model's parameters.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import get_pg_rank, get_pg_size

from .args import FINAL_OUTPUTS, HEADS, MLP_UNITS  # what each split divides (named in errors)

StateDict = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Split:
    dim: int            # 0: output rows (column-parallel), 1: input columns (row-parallel)
    what: str           # what is being divided, for the error message
    stride: int = 1     # independent blocks along dim, each split on its own (megatron partition_stride)
    per_head: bool = False  # split in whole heads (unit head_dim), not single rows/columns


_RULES: Tuple[Tuple[re.Pattern, Split], ...] = tuple((re.compile(p), s) for p, s in (
    (r"blocks\.\d+\.attn\.qkv\.(weight|bias)", Split(0, HEADS, stride=3, per_head=True)),
    (r"blocks\.\d+\.attn\.proj\.weight", Split(1, HEADS, per_head=True)),
    (r"blocks\.\d+\.mlp\.w12\.(weight|bias)", Split(0, MLP_UNITS, stride=2)),
    (r"blocks\.\d+\.mlp\.(w3|fc2)\.weight", Split(1, MLP_UNITS)),
    (r"blocks\.\d+\.mlp\.fc1\.(weight|bias)", Split(0, MLP_UNITS)),
    (r"(blocks\.\d+|final_layer)\.adaLN_modulation\.1\.(weight|bias)",
     Split(0, "adaLN outputs (k x model.hidden_size)")),
    (r"final_layer\.linear\.(weight|bias)", Split(0, FINAL_OUTPUTS)),
))


def split_of(key: str) -> Optional[Split]:
    """How ``key`` (official name) is split under TP; None for a replicated tensor."""
    for pattern, split in _RULES:
        if pattern.fullmatch(key):
            return split
    return None


def _units(key: str, t: torch.Tensor, split: Split, head_dim: int, tp_size: int) -> int:
    """Rows/columns of one rank within one stride block; ValueError naming the key if it does not divide."""
    n = t.shape[split.dim]
    unit = head_dim if split.per_head else 1
    if n % (split.stride * unit):
        raise ValueError(f"{key}: dimension {split.dim} of size {n} is not {split.stride} blocks of whole "
                         f"{'heads of ' + str(head_dim) if split.per_head else 'units'}; wrong model args?")
    count = n // split.stride // unit
    if count % tp_size:
        raise ValueError(f"cannot shard {key} over tensor parallel size {tp_size}: {split.what} = {count} "
                         f"is not divisible by {tp_size}")
    return n // split.stride // tp_size


def _blocked(t: torch.Tensor, split: Split) -> torch.Tensor:
    """View ``t`` with its split dimension as (stride, n / stride)."""
    d = split.dim
    return t.reshape(*t.shape[:d], split.stride, t.shape[d] // split.stride, *t.shape[d + 1:])


def _unblocked(t: torch.Tensor, split: Split) -> torch.Tensor:
    d = split.dim
    return t.reshape(*t.shape[:d], t.shape[d] * t.shape[d + 1], *t.shape[d + 2:])


def shard_tensor(key: str, full: torch.Tensor, head_dim: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Rank ``tp_rank``'s shard of the full tensor ``key`` (the tensor itself when replicated)."""
    split = split_of(key)
    if split is None or tp_size == 1:
        return full
    per = _units(key, full, split, head_dim, tp_size)
    part = _blocked(full, split).narrow(split.dim + 1, tp_rank * per, per)
    return _unblocked(part, split).contiguous()


def shard_state_dict(full_sd: Mapping[str, torch.Tensor], args, tp_rank: int, tp_size: int) -> StateDict:
    """Rank ``tp_rank`` of ``tp_size``: its local state dict from a full official-layout one.

    ``args`` is the model's ``ModelArgs`` (head size for the per-head splits). Keys the rules do not
    name pass through unchanged, so a strict load still reports unknown or missing keys.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tensor parallel rank {tp_rank} outside 0..{tp_size - 1}")
    head_dim = args.hidden_size // args.num_heads
    return {k: shard_tensor(k, v, head_dim, tp_rank, tp_size) for k, v in full_sd.items()}


def merge_tensor(key: str, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``shard_tensor``: the full tensor from every rank's shard (rank order)."""
    split = split_of(key)
    if split is None or len(parts) == 1:
        return parts[0]
    return _unblocked(torch.cat([_blocked(p, split) for p in parts], dim=split.dim + 1), split)


def merge_state_dicts(local_sds: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """Full state dict from the local state dicts of all ranks of a TP group (rank order), no communication."""
    return {k: merge_tensor(k, [sd[k] for sd in local_sds]) for k in local_sds[0]}


def gather_state_dict(local_sd: Mapping[str, torch.Tensor], args, group=None) -> StateDict:
    """All-gather over the TP group: full official-layout tensors on every rank of the group.

    Collective: every rank of ``group`` (default: megatron's TP group) must call it with the same keys
    in the same order (true for state dicts of the same model). Replicated tensors are taken from the
    local rank as they are (cloned). ``args`` checks that per-head shards hold whole heads.
    """
    group = group if group is not None else parallel_state.get_tensor_model_parallel_group()
    size = get_pg_size(group)
    head_dim = args.hidden_size // args.num_heads
    out: StateDict = {}
    for key, t in local_sd.items():
        split = split_of(key)
        if split is None or size == 1:
            out[key] = t.detach().clone()
            continue
        if split.per_head and (t.shape[split.dim] // split.stride) % head_dim:
            raise ValueError(f"{key}: local shard of size {t.shape[split.dim]} does not hold whole heads of {head_dim}")
        t = t.detach().contiguous()
        parts: List[torch.Tensor] = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t, group=group)
        out[key] = merge_tensor(key, parts)
    return out


def model_tp(model: torch.nn.Module) -> Tuple[int, int, Optional[dist.ProcessGroup]]:
    """(rank, size, group) of the TP group the model's megatron layers were built in; (0, 1, None) without any."""
    for m in model.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
            return get_pg_rank(m.tp_group), get_pg_size(m.tp_group), m.tp_group
    return 0, 1, None
