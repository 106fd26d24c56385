"""Model FLOPs of one LightningDiT / SFD training image, from the architecture (the MFU numerator).

Convention (as in MFU reports for transformers): matrix multiplications only, 2 FLOPs per multiply-add;
norms, RoPE, modulation, softmax and activations are left out (a few % at these widths). A training
step costs 3x the forward (the backward computes gradients for inputs and weights: 2x), no extra
recomputation counted (activation checkpointing adds work but not *model* FLOPs).

With T tokens, width D, SwiGLU width H and depth L, one forward of one image is

    blocks       L * [ 2T(3D*D) qkv + 2T(D*D) proj + 4T^2*D attention (QK^T and AV)
                       + 2T(D*2H + H*D) SwiGLU (or 2T(2*D*H) GELU MLP) + 2D(6D) adaLN ]
    embedders    2T(p^2 C * D) patch + time MLP(s) 2(256*D' + D'^2) each (D' = D/2 twice for SFD's
                 two time embedders, else D once); the label embedding is a lookup
    final layer  2D(2D) adaLN + 2T(D * p^2 C_out)
    REPA         2T(D*P + P*P + P*F) projector (training only, P = projector width, F = feature dim)

SFD-XXL at 256 tokens (D 1536, H 4096, L 24, REPA P 2048 F 768): 362 GFLOP forward, 1.09 TFLOP per
training image. ``tests/models/test_flops.py`` checks the formula against torch.utils.flop_counter.
"""
from __future__ import annotations

from typing import Dict

from .lightningdit import ModelArgs


def forward_flops(args: ModelArgs, training: bool = True) -> Dict[str, int]:
    """FLOPs of one image's forward pass, by part; REPA's projector only counts in training."""
    tokens, d, h = args.grid ** 2, args.hidden_size, args.mlp_hidden
    mlp = 2 * tokens * (d * 2 * h + h * d) if args.use_swiglu else 2 * tokens * 2 * d * h
    adaln = 4 if args.wo_shift else 6
    block = 2 * tokens * 3 * d * d + 2 * tokens * d * d + 4 * tokens * tokens * d + mlp + 2 * d * adaln * d
    patch_in = args.patch_size ** 2 * args.in_channels
    widths = [d // 2, d // 2] if args.dual_time_embed else [d]
    embed = 2 * tokens * patch_in * d + sum(2 * (256 * w + w * w) for w in widths)
    final = 2 * d * 2 * d + 2 * tokens * d * args.patch_size ** 2 * args.out_channels
    p, f = args.repa_projector_dim, args.repa_feature_dim
    repa = 2 * tokens * (d * p + p * p + p * f) if args.use_repa and training else 0
    return {"blocks": args.depth * block, "embedders": embed, "final layer": final, "REPA projector": repa}


def training_flops_per_image(args: ModelArgs) -> int:
    """Forward + backward (3x the forward) of one training image."""
    return 3 * sum(forward_flops(args, training=True).values())


def sampling_flops_per_call(args: ModelArgs) -> int:
    """One network evaluation at sampling time (no REPA projector); CFG doubles the batch."""
    return sum(forward_flops(args, training=False).values())
