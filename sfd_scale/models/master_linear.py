"""Linear layers over fp32 master weights under autocast, with the weight gradient written in fp32 by its GEMM.

Why: the plain engine trains the official way, fp32 weights + bf16 autocast. Autocast casts a weight to bf16
for the GEMM, and autograd casts that cast's gradient back: the weight-gradient GEMM writes bf16 and one more
kernel reads it and writes the fp32 ``.grad`` (2 + 4 bytes per parameter per step, ~4 MB per sample per
block of SFD-XXL at micro-batch 64, ``benchmarks/cost_model.md``). Here the weight-gradient GEMM accumulates
in fp32 and writes fp32 itself (cuBLAS with an fp32 output, ``torch.mm(..., out_dtype=torch.float32)``), as
TransformerEngine's / apex's gradient-accumulation fusion does; the bias gradient is summed straight into
fp32. The forward and the input gradient are exactly autocast's (same casts, same GEMMs); the parameter
gradients are the same sums, rounded once to fp32 instead of to bf16 and then widened (closer to the fp32
gradient, not bitwise autocast's). With autocast off, or weights already in the compute dtype (megatron /
DeepSpeed bf16 weights), ``linear`` is ``F.linear``: fp32 training is bitwise unchanged.

``wgrad_mm`` is a custom op so that inductor keeps it one extern GEMM (it does not lower ``mm.dtype`` on CPU;
on CUDA it is one cuBLAS call) and the cost model counts it as a GEMM (its FLOP formula is registered).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import flop_counter


@torch.library.custom_op("sfd::wgrad_mm", mutates_args=())
def wgrad_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of half-precision operands, accumulated and returned in float32."""
    if a.device.type == "cpu":  # no CPU kernel for mm.dtype: the same exact products, summed in fp32
        return torch.mm(a.float(), b.float())
    return torch.mm(a, b, out_dtype=torch.float32)


@wgrad_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)


@flop_counter.register_flop_formula(torch.ops.sfd.wgrad_mm)
def _wgrad_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.mm_flop(a_shape, b_shape)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs linears in on this device type, None when it is off (or has no autocast)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class MasterWeightLinear(torch.autograd.Function):
    """``F.linear`` of ``x``, ``weight``, ``bias`` cast to ``dtype`` (autocast's forward), parameter gradients in
    fp32 from the GEMM / the sum themselves (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        x_c, w_c = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x_c, w_c)
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        return F.linear(x_c, w_c, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, dy):
        x_c, w_c = ctx.saved_tensors
        needs_x, needs_w, needs_b, _ = ctx.needs_input_grad
        dy_2d = dy.reshape(-1, dy.shape[-1])
        dx = (dy @ w_c).to(ctx.x_dtype) if needs_x else None
        dw = wgrad_mm(dy_2d.t(), x_c.reshape(-1, x_c.shape[-1])) if needs_w else None
        db = dy_2d.sum(0, dtype=torch.float32) if needs_b and ctx.has_bias else None
        return dx, dw, db, None


def master_weight_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         dtype: torch.dtype) -> torch.Tensor:
    return MasterWeightLinear.apply(x, weight, bias, dtype)


def uses_master_weight_path(weight: torch.Tensor, dtype: Optional[torch.dtype]) -> bool:
    """Whether a linear over ``weight`` under compute ``dtype`` (None: no autocast) takes ``MasterWeightLinear``:
    fp32 weights that train, in a lower-precision compute dtype."""
    return (dtype is not None and dtype != torch.float32 and weight.dtype == torch.float32
            and weight.requires_grad and torch.is_grad_enabled())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` as autocast runs it, with fp32 parameter gradients written by their own kernels."""
    dtype = autocast_dtype(x.device.type)
    if uses_master_weight_path(weight, dtype):
        return master_weight_linear(x, weight, bias, dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, initialisation and state-dict keys) computing ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
