"""Embeddings of LightningDiT: fixed sin-cos positions, 2D RoPE, timestep (single / dual SFD), label.

Patch embedding is timm's ``PatchEmbed`` (Conv2d p x p, stride p, row-major tokens), used as is.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .master_linear import Linear


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) MAE-style table: first dim/2 encode the column j, last dim/2 the row i.

    Each half is [sin(pos*w_k), cos(pos*w_k)], w_k = 10000^(-k/(dim/4)), computed in float64 like the
    official numpy code and returned as float32.
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2D sin-cos position table")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()


class Rope2D(nn.Module):
    """EVA-02 style 2D rotary embedding on token-major (..., T, heads, d_h): first d_h/2 dims rotate with the
    row index, last d_h/2 with the column index; adjacent dim pairs (2m, 2m+1) share frequency
    10000^(-2m/(d_h/2)).

    Token-major because that is how q and k leave the qkv projection: the official code rotates
    (B, heads, T, d_h) after a permute, and the per-element arithmetic here is the same, bit for bit. Under
    compile the QK-norm statistics and the rotation then read and write in one loop order, so inductor makes
    them one kernel (measured on XXL blocks by ``sfd cost-model``: one kernel instead of five forward,
    1.7 MB less traffic per sample per block).

    The cos/sin tables are persistent (T, d_h) buffers (they are part of the official state dict).
    """

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0):
        super().__init__()
        half = head_dim // 2
        if head_dim % 4:
            raise ValueError(f"head dim {head_dim} must be divisible by 4 for 2D RoPE")
        freqs = 1.0 / theta ** (torch.arange(0, half, 2)[: half // 2].float() / half)
        pos = torch.arange(grid) / grid * grid  # official positions: integers for power-of-two grids
        angles = torch.repeat_interleave(pos[:, None] * freqs[None, :], 2, dim=-1)  # (grid, half)
        table = torch.cat([angles[:, None, :].expand(grid, grid, half),
                           angles[None, :, :].expand(grid, grid, half)], dim=-1)  # (row, col, d_h)
        self.register_buffer("freqs_cos", table.cos().reshape(-1, head_dim))
        self.register_buffer("freqs_sin", table.sin().reshape(-1, head_dim))
        # freqs_sin times rotate_half's sign (-1, +1) per dim pair, derived from freqs_sin (also when a state dict
        # brings its own table: the hook below) and not stored
        self.register_buffer("signed_sin", self._signed(self.freqs_sin), persistent=False)
        self.register_load_state_dict_post_hook(Rope2D._derive_signed_sin)

    @staticmethod
    def _signed(sin: torch.Tensor) -> torch.Tensor:
        return (sin.unflatten(-1, (-1, 2)) * sin.new_tensor([-1.0, 1.0])).flatten(-2)

    @staticmethod
    def _derive_signed_sin(module: "Rope2D", incompatible_keys) -> None:
        with torch.no_grad():
            module.signed_sin.copy_(module._signed(module.freqs_sin))

    @staticmethod
    def swap_pairs(x: torch.Tensor) -> torch.Tensor:
        """(x0, x1) -> (x1, x0) per dim pair: pure indexing (a roll of each pair: the same index arithmetic as a
        flip under compile, and in eager on the CPU a fifth of ``flip``'s time, forward + backward).
        ``swap_pairs(x) * signed_sin`` is the official ``stack((-x1, x0)) * sin`` bit for bit (a sign flip is
        exact, so (-x1) * s = x1 * (-s)), and inductor fuses it into the rotation. The sign lives in the table
        rather than in a third multiply so the rotation's backward reads four inputs (the gradient twice, cos,
        sin), under inductor's threshold for recomputing a pointwise result in each consumer instead of storing
        it (measured on XXL blocks by ``sfd cost-model``: 2 kernels and 0.8 MB per sample per block
        fewer)."""
        return x.unflatten(-1, (-1, 2)).roll(1, -1).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate token-major ``x`` (..., T, heads, d_h).

        The rotation is computed in float32 against the float32 tables (the official precision) and its
        OUTPUT cast back to the input's dtype: the official code returns float32 for a bf16 q / k, so
        attention never got bf16 inputs. In float32 the casts are no-ops (bitwise the official result);
        under compile they fuse into the rotation kernel."""
        xf = x.float()
        cos, sin = self.freqs_cos[:, None], self.signed_sin[:, None]  # (T, 1, d_h): the same angle for every head
        return (xf * cos + self.swap_pairs(xf) * sin).to(x.dtype)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t*f_k), sin(t*f_k)] with f_k = exp(-ln(max_period) k / (dim/2)); t used as is (in [0,1])."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Linear(256 -> W) -> SiLU -> Linear(W -> W) on sinusoidal features (keys ``mlp.0`` / ``mlp.2``)."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(Linear(frequency_dim, width), nn.SiLU(), Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t, self.frequency_dim)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """(num_classes + 1) x D table when label dropout is on; the last row is the null class.

    In training mode labels are replaced by the null index with probability ``dropout_prob`` (global
    torch RNG, like the official code; the trainer seeds it per step for exact resume).
    """

    def __init__(self, num_classes: int, width: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), width)

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)
