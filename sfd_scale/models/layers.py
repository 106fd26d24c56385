"""Transformer building blocks of LightningDiT on megatron-core tensor-parallel linears.

Every layer here computes exactly what the official LightningDiT layer computes; the official
parameter names are kept (``qkv``, ``proj``, ``w12``, ``w3``, ...) so an official state dict maps 1:1
at TP=1. Tensor-parallel layers hold a *local shard*: the TP degree is the ``ModelParallelConfig``'s
``tensor_model_parallel_size``, the group megatron's parallel_state's (``tensor_parallel_group``), set up by
``sfd_scale/parallel`` before a model is built; nothing here creates one.

Precision under bf16 training (fp32 weights + bf16 autocast on the plain engine, bf16 weights on megatron /
DeepSpeed). The official code, run that way, hands attention fp32 q, k with a bf16 v: its RMSNorm returns
``x_hat.type_as(x) * weight`` (a bf16 q times an fp32 weight is fp32) and its RoPE multiplies by fp32 tables;
only autocast's cast inside SDPA brings them back to bf16 (an extra read and write of q and k, and the
flash-attn package never applies). Here QK-norm (``rms_norm``, ``_QKLayerNorm``) and RoPE
(``embeddings.Rope2D``) compute in fp32 inside (norm statistics, rotation) and round their OUTPUT once to the
input's dtype, so q, k, v reach ``attention`` in the compute dtype. Everything else keeps the official dtype
rules: the block norms see the fp32 residual stream and return fp32, ``modulate`` promotes like the official
one (its output only feeds an autocast linear), the residual adds stay fp32. In fp32 every added cast is a
no-op and the products keep the official order, so fp32 results are bitwise unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                           copy_to_tensor_model_parallel_region)
from megatron.core.utils import get_pg_size

from .master_linear import linear

try:  # optional GPU extra: used only on CUDA tensors in half precision
    from flash_attn import __version__ as flash_attn_version  # type: ignore
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # pragma: no cover - flash-attn needs CUDA to build
    flash_attn_func, flash_attn_version = None, None


def xavier_uniform(weight: torch.Tensor) -> None:
    nn.init.xavier_uniform_(weight)


def zeros(weight: torch.Tensor) -> None:
    nn.init.zeros_(weight)


class _ExactSingleRank:
    """Mixin for megatron's parallel linears: with one TP rank, compute ``F.linear`` (bias fused in the GEMM).

    Why: megatron adds the bias after the matmul, which rounds differently from ``nn.Linear`` by ~1e-6;
    adaptive dopri5 sampling amplifies that to ~1e-3 in the final latent. With one TP rank there is no
    communication to overlap, so we compute exactly what the official ``nn.Linear`` computes (under autocast
    with fp32 weights through ``master_linear.linear``: the same forward, fp32 weight gradients from the GEMM);
    with several ranks megatron's forward (async all-reduce, sequence parallel) runs unchanged.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tp_size = get_pg_size(self.tp_group)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.tp_size == 1 and not self.sequence_parallel:
            return linear(x, self.weight, self.bias), None
        return super().forward(x, *args, **kwargs)


def tensor_parallel_group(config: ModelParallelConfig):
    """The TP group megatron's linears of a ``config.tensor_model_parallel_size``-way model use: megatron's,
    from the layout ``sfd_scale.parallel.layout`` set up BEFORE building; at TP = 1 without a layout None
    (megatron's linears then run on one rank with no process group). ValueError when the two disagree:
    a model is built for the layout it will run in."""
    group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
    if get_pg_size(group) != config.tensor_model_parallel_size:
        raise ValueError(f"the model is built for tensor parallel size {config.tensor_model_parallel_size} but the "
                         f"tensor-parallel group has {get_pg_size(group)} rank(s): set up the layout first "
                         f"(sfd_scale.parallel.layout.initialize) and build with "
                         f"parallel_config(tensor_parallel={get_pg_size(group)})")
    return group


class ColumnLinear(_ExactSingleRank, ColumnParallelLinear):
    pass


class RowLinear(_ExactSingleRank, RowParallelLinear):
    pass


def column_linear(in_features: int, out_features: int, config: ModelParallelConfig, *, gather_output: bool,
                  init=xavier_uniform, stride: int = 1) -> ColumnLinear:
    """Linear split along its outputs. Bias always on (every LightningDiT linear has one).

    ``stride`` = number of independent output blocks each split on its own (fused qkv: 3, SwiGLU w12: 2),
    as megatron's ``partition_stride``. With CPU initialisation megatron draws the full weight and
    hands each rank block r of every stride block, so a TP=N model from a seed is exactly the TP=1
    model from that seed, sharded (at TP=1 it changes nothing).
    """
    return ColumnLinear(in_features, out_features, config=config, init_method=init, bias=True,
                        gather_output=gather_output, stride=stride,
                        tp_group=tensor_parallel_group(config))


def row_linear(in_features: int, out_features: int, config: ModelParallelConfig,
               init=xavier_uniform) -> RowLinear:
    """Linear split along its inputs (input already split), output all-reduced."""
    return RowLinear(in_features, out_features, config=config, init_method=init, bias=True,
                     input_is_parallel=True, skip_bias_add=False,
                     tp_group=tensor_parallel_group(config))


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, normalised in float32 then cast back (official order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Statistics, normalisation and the weight product in float32, ONE cast back to ``x``'s dtype.

    The official ``(x_hat).type_as(x) * weight`` promotes a bf16 input to float32 when the weight is
    float32 (fp32 weights + autocast), which made QK-norm hand fp32 q, k to attention. Here the output
    always has the input's dtype (bf16 in, bf16 out: one rounding instead of two). In float32 both orders
    are the same two multiplications, so fp32 results are bitwise those of the official code.
    """
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


class _HeadSharedRMSNorm(RMSNorm):
    """QK-norm under TP: every rank applies the one per-head_dim weight to its *own* heads only, so its
    local gradient is a partial sum over heads. ``copy_to_tensor_model_parallel_region`` (identity
    forward, all-reduce backward) makes every rank's gradient the full one inside autograd, so no
    optimizer or engine has to know (megatron's own models instead leave it to finalize_model_grads)."""

    def __init__(self, dim: int, tp_group):
        super().__init__(dim)
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, copy_to_tensor_model_parallel_region(self.weight, group=self.tp_group), self.eps)


class _QKLayerNorm(nn.LayerNorm):
    """Affine LayerNorm QK-norm (non-RMSNorm models) whose output keeps the input's dtype: autocast runs
    ``layer_norm`` in float32 and would hand fp32 q, k to attention (a no-op cast in fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).to(x.dtype)


class _HeadSharedLayerNorm(_QKLayerNorm):
    """Affine LayerNorm QK-norm under TP; gradients summed as in _HeadSharedRMSNorm."""

    def __init__(self, dim: int, tp_group):
        super().__init__(dim)
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = (copy_to_tensor_model_parallel_region(p, group=self.tp_group) for p in (self.weight, self.bias))
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps).to(x.dtype)


def make_norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    return RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def modulate(x: torch.Tensor, shift: Optional[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift in the official order and dtype rule: its output only feeds a linear, which
    autocast casts to the compute dtype anyway (a fused cast under compile), so nothing is forced here."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


def _uses_flash_attn(device: torch.device, dtype: torch.dtype) -> bool:
    return flash_attn_func is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention over (B, heads, T, d_h): flash-attn on CUDA half precision, else SDPA.

    q, k and v arrive in the compute dtype (bf16 under bf16 training: see ``rms_norm`` and ``Rope2D``),
    which is what flash-attn and SDPA's flash kernel need.
    """
    if _uses_flash_attn(q.device, q.dtype):
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


# SDPA's CUDA kernels in torch's default priority order: (name, user switch, input check); math always fits.
_SDPA_CUDA_KERNELS = (
    ("flash", torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.can_use_flash_attention),
    ("efficient", torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.can_use_efficient_attention),
    ("math", torch.backends.cuda.math_sdp_enabled, lambda params: True),
    ("cudnn", torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.can_use_cudnn_attention),
)


def sdpa_cuda_kernel(q: torch.Tensor) -> str:
    """The SDPA kernel torch picks for CUDA self-attention on inputs like ``q`` (switches + torch's own
    input checks, first fit in priority order); ``q`` on another device fits only "math"."""
    params = torch.backends.cuda.SDPAParams(q, q, q, None, 0.0, False, False)
    return next((name for name, enabled, fits in _SDPA_CUDA_KERNELS if enabled() and fits(params)), "none enabled")


def attention_backend(device: torch.device, dtype: torch.dtype, head_dim: int = 64) -> str:
    """What ``attention()`` runs for (B, heads, T, ``head_dim``) inputs of this device and dtype, for the
    start-up log: "flash-attn <version>", "SDPA <kernel>" on CUDA, "SDPA (CPU)" (or the device type)."""
    device = torch.device(device)
    if _uses_flash_attn(device, dtype):
        return f"flash-attn {flash_attn_version}"
    if device.type != "cuda":
        return f"SDPA ({device.type.upper()})"
    return f"SDPA {sdpa_cuda_kernel(torch.zeros(1, 1, 8, head_dim, device=device, dtype=dtype))}"


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, optional per-head QK RMSNorm and 2D RoPE.

    Under TP each rank owns ``num_heads / tp`` whole heads; the local qkv shard is laid out
    [q | k | v] for those heads (``tensor_parallel.py`` slices the official weight that way).
    """

    def __init__(self, dim: int, num_heads: int, config: ModelParallelConfig, *, qk_norm: bool, use_rmsnorm: bool):
        super().__init__()
        tp_size = config.tensor_model_parallel_size
        self.head_dim = dim // num_heads
        self.local_heads = num_heads // tp_size
        self.qkv = column_linear(dim, 3 * dim, config, gather_output=False, stride=3)
        # official QK-norm: RMSNorm with use_rmsnorm, else an *affine* LayerNorm (torch default eps)
        if tp_size == 1:
            norm = ((lambda: RMSNorm(self.head_dim) if use_rmsnorm else _QKLayerNorm(self.head_dim))
                    if qk_norm else nn.Identity)
        else:  # the norm weights are shared by heads on several ranks: gradients summed over TP
            group = tensor_parallel_group(config)
            shared = _HeadSharedRMSNorm if use_rmsnorm else _HeadSharedLayerNorm
            norm = (lambda: shared(self.head_dim, group)) if qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        self.proj = row_linear(dim, dim, config)

    def forward(self, x: torch.Tensor, rope: Optional[nn.Module] = None) -> torch.Tensor:
        b, n, _ = x.shape
        qkv, _ = self.qkv(x)
        # unbind the [q | k | v] axis in place: token-major (B, T, heads, d_h) views, the backward stacks dq, dk,
        # dv straight into qkv's layout. QK-norm (over d_h) and RoPE run token-major, in qkv's own loop order
        # (one fused kernel under compile, see Rope2D); attention gets the (B, heads, T, d_h) views the
        # official permute(2, 0, 3, 1, 4) makes: the same values, strided as flash-attn and SDPA accept.
        q, k, v = qkv.reshape(b, n, 3, self.local_heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(b, n, -1)
        out, _ = self.proj(out)
        return out


class SwiGLU(nn.Module):
    """h = SiLU(a) * b with [a | b] = w12(x); out = w3(h). Local w12 shard is [a_r | b_r] under TP."""

    def __init__(self, dim: int, hidden: int, config: ModelParallelConfig):
        super().__init__()
        self.w12 = column_linear(dim, 2 * hidden, config, gather_output=False, stride=2)
        self.w3 = row_linear(hidden, dim, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x12, _ = self.w12(x)
        a, b = x12.chunk(2, dim=-1)
        out, _ = self.w3(F.silu(a) * b)
        return out


class GeluMlp(nn.Module):
    """timm-style Mlp (fc1 -> GELU(tanh) -> fc2), the non-SwiGLU LightningDiT/DiT MLP."""

    def __init__(self, dim: int, hidden: int, config: ModelParallelConfig):
        super().__init__()
        self.fc1 = column_linear(dim, hidden, config, gather_output=False)
        self.fc2 = row_linear(hidden, dim, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc1(x)
        out, _ = self.fc2(F.gelu(h, approximate="tanh"))
        return out


class AdaLNModulation(nn.Module):
    """SiLU -> Linear(D -> k*D) giving k modulation vectors. Named ``1`` like the official Sequential.

    The linear is column-parallel with gathered output: every rank needs all k*D values.
    """

    def __init__(self, dim: int, chunks: int, config: ModelParallelConfig):
        super().__init__()
        self.chunks = chunks
        self.add_module("1", column_linear(dim, chunks * dim, config, gather_output=True, init=zeros))

    def forward(self, c: torch.Tensor):
        out, _ = getattr(self, "1")(F.silu(c))
        return out.chunk(self.chunks, dim=1)
