"""Model sizes (SFD_ALGORITHM.md §11) and the architecture switches, on CPU.

Big models are built on the meta device (shapes only: the 1.6B model would need ~7 GB in fp32), and
``test_meta_build_is_honest`` shows that a meta build counts exactly what a real build counts.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from sfd_scale.models.layers import GeluMlp, RMSNorm, SwiGLU
from sfd_scale.models.lightningdit import SIZES, LightningDiT, ModelArgs, args_for, count_parameters
from sfd_scale.models.summary import build_meta, parameter_breakdown

# SFD /1, 48 channels, REPA projector 2048: (with projector, without), in M as stated in §11
TABLE = {"S": (39.5, 32.9), "B": (137.6, 130.3), "L": (465.5, 457.7), "XL": (682.8, 674.6),
         "1p0B": (1037.2, 1028.3), "1p6B": (1639.7, 1630.2)}

TINY = ModelArgs(input_size=8, patch_size=1, in_channels=6, hidden_size=64, depth=2, num_heads=4, num_classes=10,
                 use_repa=False)


def meta_count(args: ModelArgs) -> int:
    model = build_meta(args)
    # the point of the meta build: no parameter may have been materialised anywhere
    assert {p.device.type for p in model.parameters()} == {"meta"}
    return count_parameters(model)


@pytest.mark.parametrize("size", list(TABLE))
@pytest.mark.parametrize("with_projector", [True, False], ids=["repa", "no-repa"])
def test_sfd_size_matches_official_table(size, with_projector):
    args = args_for(f"LightningDiT-{size}/1", in_channels=48, use_repa=with_projector, repa_projector_dim=2048)
    assert args.dual_time_embed  # SFD: texture + semantic time embedders
    expected = TABLE[size][0 if with_projector else 1]
    assert round(meta_count(args) / 1e6, 1) == pytest.approx(expected, abs=1e-9)


def test_plain_xl_32_channels_is_675_26m():
    """Issue acceptance: single time embedder, no REPA, no semantic channels."""
    args = args_for("LightningDiT-XL/1", in_channels=32, dual_time_embed=False, use_repa=False)
    assert f"{meta_count(args) / 1e6:.2f}" == "675.26"


def test_table_covers_every_registered_size():
    assert set(TABLE) == set(SIZES)


@pytest.mark.parametrize("args", [
    TINY,
    dataclasses.replace(TINY, dual_time_embed=False, use_repa=True, repa_projector_dim=32),
    dataclasses.replace(TINY, patch_size=2, wo_shift=True, learn_sigma=True),
    dataclasses.replace(TINY, use_swiglu=False, use_rmsnorm=False, use_rope=False, use_qknorm=False),
], ids=["sfd", "plain-repa", "p2-woshift-sigma", "gelu-layernorm-norope"])
def test_meta_build_is_honest(args):
    """Same parameter names, shapes and per-part counts on meta as on a real CPU build."""
    real, meta = LightningDiT(args), build_meta(args)

    def shapes(model):  # megatron's _extra_state placeholders are None, not tensors
        return {k: tuple(v.shape) for k, v in model.state_dict().items() if torch.is_tensor(v)}

    assert shapes(real) == shapes(meta)
    assert count_parameters(real) == count_parameters(meta)
    parts = parameter_breakdown(real)
    assert parts == parameter_breakdown(meta)
    assert sum(sum(p.values()) for p in parts.values()) == count_parameters(real)


@pytest.mark.parametrize("size", list(SIZES))
def test_patch2_variants(size):
    """/2 on 16x16 latents: 64 tokens; only patch embed, final linear and pos table change size."""
    p1, p2 = (args_for(f"LightningDiT-{size}/{p}", in_channels=48, use_repa=True) for p in (1, 2))
    model = build_meta(p2)
    d, c = p2.hidden_size, p2.in_channels
    assert p2.grid ** 2 == 64 and model.x_embedder.num_patches == 64
    assert model.pos_embed.shape == (1, 64, d)
    assert model.final_layer.linear.weight.shape == (4 * c, d)
    assert model.feat_rope.freqs_cos.shape == (64, d // p2.num_heads)
    # conv weight D*C*(p^2-1) + final linear (D+1)*C*(p^2-1) more, pos table D*(256-64) fewer
    delta = d * c * 3 + (d + 1) * c * 3 - d * (256 - 64)
    assert meta_count(p2) - meta_count(p1) == delta


# ------------------------------------------------------------------------------- tiny real forwards
def forward(args: ModelArgs, train: bool = False, batch: int = 2):
    torch.manual_seed(0)
    model = LightningDiT(args).train(train)
    x = torch.randn(batch, args.in_channels, args.input_size, args.input_size)
    t = (torch.rand(batch), torch.rand(batch)) if args.dual_time_embed else torch.rand(batch)
    y = torch.randint(0, args.num_classes, (batch,))
    with torch.no_grad():
        return model, model(x, t, y)


def test_patch2_tiny_forward():
    args = dataclasses.replace(TINY, patch_size=2)
    model, out = forward(args)
    assert args.grid ** 2 == 16 and model.pos_embed.shape == (1, 16, 64)
    assert out.shape == (2, 6, 8, 8) and torch.isfinite(out).all()


def test_wo_shift_uses_4d_adaln():
    args = dataclasses.replace(TINY, wo_shift=True)
    model, out = forward(args)
    for block in model.blocks:
        assert getattr(block.adaLN_modulation, "1").weight.shape == (4 * 64, 64)
    # the final layer always has (shift, scale)
    assert getattr(model.final_layer.adaLN_modulation, "1").weight.shape == (2 * 64, 64)
    assert getattr(forward(TINY)[0].blocks[0].adaLN_modulation, "1").weight.shape == (6 * 64, 64)
    assert out.shape == (2, 6, 8, 8)


@pytest.mark.parametrize("patch", [1, 2])
def test_learn_sigma_doubles_final_outputs(patch):
    args = dataclasses.replace(TINY, learn_sigma=True, patch_size=patch)
    model, out = forward(args)
    assert args.out_channels == 12
    assert model.final_layer.linear.weight.shape == (patch ** 2 * 12, 64)
    assert out.shape == (2, 6, 8, 8)  # like the official forward, the sigma half is dropped


def test_gelu_mlp_without_swiglu():
    args = dataclasses.replace(TINY, use_swiglu=False)
    model, out = forward(args)
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, GeluMlp) and not any(isinstance(m, SwiGLU) for m in model.modules())
    assert mlp.fc1.weight.shape == (4 * 64, 64) and mlp.fc2.weight.shape == (64, 4 * 64)  # H = D*mlp_ratio
    assert out.shape == (2, 6, 8, 8) and torch.isfinite(out).all()


def test_layernorm_without_rmsnorm():
    """Block and final norms become LayerNorm without affine (eps 1e-6): no norm weights stored."""
    args = dataclasses.replace(TINY, use_rmsnorm=False)
    model, out = forward(args)
    norms = [b.norm1 for b in model.blocks] + [b.norm2 for b in model.blocks] + [model.final_layer.norm_final]
    for norm in norms:
        assert isinstance(norm, nn.LayerNorm) and not norm.elementwise_affine and norm.eps == 1e-6
    keys = model.state_dict().keys()
    assert not any(k.endswith(("norm1.weight", "norm2.weight", "norm_final.weight")) for k in keys)
    assert not any(isinstance(m, RMSNorm) for m in model.modules())
    assert out.shape == (2, 6, 8, 8) and torch.isfinite(out).all()


def test_no_rope_buffers_without_rope():
    args = dataclasses.replace(TINY, use_rope=False)
    model, out = forward(args)
    assert model.feat_rope is None
    assert not any(k.startswith("feat_rope") for k in model.state_dict())
    assert any(k.startswith("feat_rope") for k in forward(TINY)[0].state_dict())
    assert out.shape == (2, 6, 8, 8)


def test_plain_model_takes_one_time_and_repa_in_training():
    args = dataclasses.replace(TINY, dual_time_embed=False, use_repa=True, repa_projector_dim=32, repa_feature_dim=24)
    model, (out, repa) = forward(args, train=True)
    assert hasattr(model, "t_embedder") and not hasattr(model, "t_embedder_sem")
    assert out.shape == (2, 6, 8, 8) and repa.shape == (2, 64, 24)
    with pytest.raises(TypeError, match="plain"):
        model(torch.randn(2, 6, 8, 8), (torch.rand(2), torch.rand(2)), torch.zeros(2, dtype=torch.long))
