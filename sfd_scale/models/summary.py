"""Architecture summary of a LightningDiT / SFD model: shapes and per-part parameter counts.

Counts come from a model built on the ``meta`` device: every layer is constructed exactly as for
training, so the numbers cannot drift from the real architecture, but no weight memory is allocated
(the 1.6B model would take ~7 GB in fp32 on CPU). ``sfd summary`` is the CLI over this.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from megatron.core import ModelParallelConfig

from ..diffusion.sfd import SFDSpec
from .lightningdit import LightningDiT, ModelArgs, args_for, count_parameters, parse_model_name

# top-level module / parameter name -> embedder sub-part; PARTS is the table's row order
_EMBEDDERS = {"x_embedder": "patch", "t_embedder": "time", "t_embedder_sem": "time", "t_embedder_tex": "time",
              "y_embedder": "label", "pos_embed": "position (frozen)"}
PARTS = ("embedders", "blocks", "final layer", "REPA projector")
_PART_OF = {"blocks": "blocks", "final_layer": "final layer", "repa_projector": "REPA projector"}


def build_meta(args: ModelArgs) -> LightningDiT:
    """The model on the ``meta`` device (shapes only, no storage).

    The megatron config asks for CPU-style initialisation: on a CUDA machine megatron otherwise
    allocates its weights with an explicit ``device=cuda`` that the device context cannot override.
    """
    config = ModelParallelConfig(use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        return LightningDiT(args, config)


def parameter_breakdown(model: nn.Module) -> Dict[str, Dict[str, int]]:
    """{part: {sub-part: count}} over all parameters (frozen pos_embed included, as count_parameters).

    Raises if a parameter belongs to no known part, so a new module cannot silently drop out of the
    table; the parts always sum to ``count_parameters(model)``.
    """
    out: Dict[str, Dict[str, int]] = {part: {} for part in PARTS}
    for name, p in model.named_parameters():
        top = name.split(".", 1)[0]
        if top in _EMBEDDERS:
            part, sub = "embedders", _EMBEDDERS[top]
        elif top in _PART_OF:
            part, sub = _PART_OF[top], _PART_OF[top]
        else:
            raise RuntimeError(f"parameter {name!r} belongs to no known model part; update summary.py")
        out[part][sub] = out[part].get(sub, 0) + p.numel()
    return out


@dataclass
class ModelSummary:
    name: str
    args: ModelArgs
    spec: Optional[SFDSpec]
    parts: Dict[str, Dict[str, int]]
    total: int
    trainable: int
    notes: List[str] = field(default_factory=list)

    def part_total(self, part: str) -> int:
        return sum(self.parts[part].values())


def summarize(args: ModelArgs, name: Optional[str] = None, spec: Optional[SFDSpec] = None) -> ModelSummary:
    """Build on meta, count, and cross-check the per-part sum against count_parameters."""
    if spec is not None:
        spec.check_channels(args.in_channels, "in_channels")
    model = build_meta(args)
    parts = parameter_breakdown(model)
    total = count_parameters(model)
    if sum(sum(p.values()) for p in parts.values()) != total:  # cannot happen unless the breakdown is broken
        raise RuntimeError("per-part parameter counts do not add up to the total")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    notes = []
    if name is not None:
        depth, hidden, heads, patch = parse_model_name(name)
        if (depth, hidden, heads, patch) != (args.depth, args.hidden_size, args.num_heads, args.patch_size):
            notes.append(f"registry size of {name} overridden")
    return ModelSummary(name or "LightningDiT (custom)", args, spec, parts, total, trainable, notes)


def cli_args(name: str, *, in_channels: int = 48, semantic_chans: Optional[int] = None, plain: bool = False,
             use_repa: bool = True, **overrides) -> Tuple[ModelArgs, Optional[SFDSpec]]:
    """ModelArgs (+ channel split when known) from the tool's flags.

    Like the official constructor, ``semantic_chans == 0`` means one time embedder (a plain model);
    ``plain`` asks for that explicitly. Without ``semantic_chans`` the split is unknown and only the
    total channel count is shown. dt does not change the architecture; the split carries the official 0.3.
    """
    if semantic_chans is None:
        spec = None
    elif not 0 <= semantic_chans < in_channels:
        raise ValueError(f"channel split does not add up: semantic_chans={semantic_chans} with "
                         f"in_channels={in_channels}")
    elif plain and semantic_chans:
        # SFDSpec has no "semantic channels but synchronous" state; refuse rather than guess
        raise ValueError("a plain model has no semantic channels: drop --semantic-chans or --plain")
    else:
        spec = SFDSpec(in_channels - semantic_chans, semantic_chans, 0.3 if semantic_chans else 0.0)
    dual = not plain and (spec is None or spec.is_async)
    args = args_for(name, in_channels=in_channels, dual_time_embed=dual, use_repa=use_repa, **overrides)
    return args, spec


# ----------------------------------------------------------------------------------------------- table
def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def format_table(s: ModelSummary) -> str:
    a = s.args
    kind = "SFD (dual time embedding)" if a.dual_time_embed else "plain (single time embedding)"
    channels = str(a.in_channels)
    if s.spec is not None and s.spec.semantic_chans:
        channels += f" ({s.spec.texture_chans} texture + {s.spec.semantic_chans} semantic)"
    rows: List[Tuple[str, str]] = [
        ("model", s.name), ("kind", kind + (", REPA" if a.use_repa else "")),
        ("depth", str(a.depth)), ("hidden", str(a.hidden_size)),
        ("heads (head dim)", f"{a.num_heads} ({a.hidden_size // a.num_heads})"),
        ("patch", str(a.patch_size)), ("tokens", f"{a.grid ** 2} ({a.grid} x {a.grid})"),
        ("in channels", channels),
        ("out channels", f"{a.out_channels}" + (" (learn_sigma: 2nd half dropped)" if a.learn_sigma else "")),
        ("mlp hidden", f"{a.mlp_hidden} ({'SwiGLU' if a.use_swiglu else 'GELU'})"),
    ]
    if a.use_repa:
        rows.append(("REPA", f"after block {a.repa_depth}, projector {a.repa_projector_dim} -> {a.repa_feature_dim}"))
    rows.append(("-", "-"))
    for part in PARTS:
        if part == "REPA projector" and not a.use_repa:
            rows.append((part, "- (off)"))
            continue
        rows.append((part, _millions(s.part_total(part))))
        if part == "embedders":
            rows += [(f"  {sub}", _millions(n)) for sub, n in s.parts[part].items()]
    rows += [("-", "-"), ("total", f"{_millions(s.total)}  ({s.total:,})"),
             ("trainable", f"{_millions(s.trainable)}  ({s.trainable:,})")]
    rows += [("note", n) for n in s.notes]
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join(rule if k == "-" else f"{k:<{width}}  {v}" for k, v in rows)
