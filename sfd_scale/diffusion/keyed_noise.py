"""Counter-based random draws on the device, keyed by (seed, step, sample index).

A training step needs, per sample, a base time, a noise latent x0 and a label-dropout coin. They must be
the same for the same sample whichever rank of whichever layout draws it, and again after a resume, so
they are a pure function of (``train.seed``, step, the sample's dataset index, element number): no
generator state. Each rank computes only its own samples, on its own device, in a few elementwise
kernels (no per-sample host work, no host -> device copy of the draws).

The generator is a stateless integer hash on int64 tensors: ``_mix_`` is a 32-bit avalanche mixer (xor-shift
/ multiply rounds) whose values stay below 2^32 and whose multipliers are below 2^31, so no product
overflows int64 and the arithmetic is exact and identical on every device (CPU, CUDA) and every torch
version. Keys are folded word by word (seed, step, index: each split into two 32-bit words) and a stream
number separates the three kinds of draw; element j of a stream hashes (key, j). The 32-bit result u
becomes a uniform in the open interval (0, 1) as (u + 0.5) / 2^32 in float64 (exact), normals come
from Box-Muller on consecutive pairs of uniforms (both outputs used), computed in float64 and rounded to
float32. The integer part is bitwise the same everywhere; the float64 ``log`` / ``cos`` / ``sin`` of CPU
and CUDA may differ in their last float64 bit, which survives the rounding to float32 only in rare ties
(|difference| <= 1 float32 ulp).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .sfd import base_time_from_draws

_M32 = 0xFFFF_FFFF
_MUL1, _MUL2 = 0x7FEB_352D, 0x68E3_1DA5  # odd (bijective mod 2^32) and < 2^31 (no int64 overflow)
_GOLDEN = 0x9E37_79B9  # 2^32 / phi: separates the words folded into a key
STREAM_NOISE, STREAM_TIME, STREAM_DROP = 1, 2, 3


def _mix_(x: torch.Tensor) -> torch.Tensor:
    """32-bit avalanche mixer on an int64 tensor of values in [0, 2^32), IN PLACE (returns ``x``): the noise
    hashes a whole latent batch of int64s, and fresh tensors per operation made the draws several times
    slower on CPU (allocation and page faults, measured: 23 -> 7 ms per 32 x 48 x 16 x 16 batch)."""
    x.bitwise_xor_(x >> 16)
    x.mul_(_MUL1).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15)
    x.mul_(_MUL2).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def _mix_int(x: int) -> int:
    """``_mix_`` on a Python int (the host-side part of a key: seed and step)."""
    x ^= x >> 16
    x = (x * _MUL1) & _M32
    x ^= x >> 15
    x = (x * _MUL2) & _M32
    return x ^ (x >> 16)


def _fold_int(key: int, word: int) -> int:
    for part in (word & _M32, (word >> 32) & _M32):
        key = _mix_int(((key ^ part) + _GOLDEN) & _M32)
    return key


def _fold(key: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
    for part in (word & _M32, (word >> 32) & _M32):
        key = _mix_(((key ^ part) + _GOLDEN) & _M32)
    return key


def sample_keys(seed: int, step: int, index: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per sample (int64 tensor on ``index``'s device) from (seed, step, dataset index)."""
    if seed < 0 or step < 0:
        raise ValueError(f"keyed draws need seed >= 0 and step >= 0, got seed={seed}, step={step}")
    host = _fold_int(_fold_int(0, seed), step)  # Python ints: no device work, no sync
    return _fold(torch.full_like(index, host, dtype=torch.int64), index.to(torch.int64))


def uniform_bits(keys: torch.Tensor, stream: int, count: int) -> torch.Tensor:
    """(B, count) 32-bit hashes of (key, stream, element) as int64."""
    stream_keys = _mix_(keys ^ _mix_int(stream * _GOLDEN & _M32)).unsqueeze(1)
    counter = torch.arange(count, dtype=torch.int64, device=keys.device)
    x = _mix_(stream_keys ^ counter)
    return _mix_(x.add_(_GOLDEN).bitwise_and_(_M32).bitwise_xor_(stream_keys))


def uniforms(keys: torch.Tensor, stream: int, count: int) -> torch.Tensor:
    """(B, count) float64 uniforms in the open interval (0, 1)."""
    return uniform_bits(keys, stream, count).double().add_(0.5).mul_(2.0 ** -32)


def normals(keys: torch.Tensor, stream: int, count: int) -> torch.Tensor:
    """(B, count) float64 standard normals: Box-Muller on uniform pairs, both outputs used."""
    pairs = (count + 1) // 2
    u = uniforms(keys, stream, 2 * pairs).view(-1, pairs, 2)
    radius = torch.sqrt(-2.0 * torch.log(u[..., 0]))
    angle = (2.0 * math.pi) * u[..., 1]
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1).view(-1, 2 * pairs)[:, :count]


def keyed_draws(seed: int, step: int, index: torch.Tensor, shape: Tuple[int, ...], *, lognorm: bool,
                dropout: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t_base (B,) float32, x0 (B, *shape) float32, drop (B,) bool) for the samples ``index`` (B,) of step
    ``step``, on ``index``'s device. ``lognorm``: base time sigmoid(N(0, 1)), else U(0, 1)
    (``sfd.base_time_from_draws``); ``drop``: uniform < ``dropout``."""
    keys = sample_keys(seed, step, index)
    numel = math.prod(shape)
    x0 = normals(keys, STREAM_NOISE, numel).float().view(-1, *shape)
    time_draw = (normals if lognorm else uniforms)(keys, STREAM_TIME, 1)[:, 0]
    t_base = base_time_from_draws(time_draw, lognorm=lognorm)
    drop = uniforms(keys, STREAM_DROP, 1)[:, 0] < dropout
    return t_base, x0, drop
