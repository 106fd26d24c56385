"""Layers under bf16 training: QK-norm and RoPE hand attention q, k, v in the compute dtype (not fp32),
and ``attention_backend`` names what attention runs, on CPU."""
from __future__ import annotations

import pytest
import torch

from sfd_scale.models import layers
from sfd_scale.models.embeddings import Rope2D
from sfd_scale.models.layers import (_SDPA_CUDA_KERNELS, RMSNorm, _QKLayerNorm, attention_backend,
                                     sdpa_cuda_kernel)
from sfd_scale.models.lightningdit import parallel_config


@pytest.mark.parametrize("norm", [RMSNorm(8), _QKLayerNorm(8)], ids=["rmsnorm", "layernorm"])
def test_qk_norms_keep_the_input_dtype_under_autocast(norm):
    x = torch.randn(2, 3, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16  # the fp32 weight does not promote
    assert torch.allclose(out.float(), norm(x), atol=0.05, rtol=0.02)  # bf16 input: 8-bit mantissa


def test_rms_norm_in_fp32_is_the_official_two_step_product():
    x, w = torch.randn(4, 16), torch.randn(16)
    official = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * w
    assert torch.equal(layers.rms_norm(x, w, 1e-6), official)


def _official_rope(rope: Rope2D, x: torch.Tensor) -> torch.Tensor:
    """The official VisionRotaryEmbeddingFast arithmetic on the official (B, heads, T, d_h) layout:
    x * cos + rotate_half(x) * sin, rotate_half by stack."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * rope.freqs_cos + rotated * rope.freqs_sin


def test_rope_rotates_token_major_in_fp32_and_returns_the_input_dtype():
    rope = Rope2D(8, 4)
    x = torch.randn(2, 16, 3, 8)  # (B, T, heads, d_h): how q and k leave the qkv projection
    official = _official_rope(rope, x.transpose(1, 2)).transpose(1, 2)
    assert torch.equal(rope(x), official)  # fp32: bitwise the official formula on its own layout
    out = rope(x.bfloat16())
    assert out.dtype == torch.bfloat16  # computed in fp32, rounded once
    assert torch.equal(out, _official_rope(rope, x.bfloat16().float().transpose(1, 2)).transpose(1, 2).bfloat16())


def test_rope_follows_a_loaded_sin_table():
    """The signed sin table is derived, not stored: a state dict's own freqs_sin (an official checkpoint's)
    is what the rotation uses, bit for bit."""
    rope, x = Rope2D(8, 4), torch.randn(2, 16, 3, 8)
    state = {k: v.clone() for k, v in rope.state_dict().items()}
    assert set(state) == {"freqs_cos", "freqs_sin"}
    state["freqs_sin"] = state["freqs_sin"] * 1.5
    rope.load_state_dict(state)
    assert torch.equal(rope(x), _official_rope(rope, x.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("use_rmsnorm", [True, False])
def test_attention_layer_feeds_bf16_qkv_under_autocast(monkeypatch, use_rmsnorm):
    seen = []

    def spy(q, k, v):
        seen.append((q.dtype, k.dtype, v.dtype))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(layers, "attention", spy)
    attn = layers.Attention(32, 4, parallel_config(), qk_norm=True, use_rmsnorm=use_rmsnorm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(torch.randn(2, 16, 32), rope=Rope2D(8, 4))
    assert seen == [(torch.bfloat16,) * 3]


def test_attention_backend_on_cpu_and_meta():
    assert attention_backend(torch.device("cpu"), torch.bfloat16) == "SDPA (CPU)"
    assert attention_backend(torch.device("cpu"), torch.float32) == "SDPA (CPU)"
    assert attention_backend(torch.device("meta"), torch.bfloat16) == "SDPA (META)"


def test_sdpa_kernel_choice_follows_torch_priority_and_input_checks():
    order = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "cudnn": "CUDNN_ATTENTION"}
    torch_order = [b for b in torch._C._get_sdp_priority_order() if b in
                   {int(getattr(torch._C._SDPBackend, n)) for n in order.values()}]
    assert [int(getattr(torch._C._SDPBackend, order[name])) for name, _, _ in _SDPA_CUDA_KERNELS] == torch_order
    # CPU tensors fail flash's and efficient's input checks: the first kernel that fits is math
    assert sdpa_cuda_kernel(torch.zeros(1, 1, 8, 64, dtype=torch.bfloat16)) == "math"
