"""Tensor-parallel sharding rules, single process: index logic, round trips, errors, agreement with megatron.

The multi-rank parity (TP=2 forward / loss / gradients / golden) is in tests/dist/test_tensor_parallel.py.
"""
from __future__ import annotations

import pytest
import torch

from sfd_scale.models.lightningdit import LightningDiT, ModelArgs
from sfd_scale.models.tensor_parallel import merge_state_dicts, shard_state_dict, split_of

SWIGLU = ModelArgs(input_size=4, patch_size=1, in_channels=12, hidden_size=72, depth=2, num_heads=6, num_classes=10,
                   use_repa=True, repa_depth=1, repa_projector_dim=8)
GELU = ModelArgs(input_size=4, patch_size=2, in_channels=6, hidden_size=48, depth=1, num_heads=6, num_classes=10,
                 use_swiglu=False, use_rmsnorm=False, wo_shift=True, learn_sigma=True, dual_time_embed=False)


def numbered(args: ModelArgs) -> dict:
    """A full state dict of the model's shapes whose every entry is distinct (so any mix-up shows)."""
    torch.manual_seed(0)
    sd = {k: v for k, v in LightningDiT(args).state_dict().items() if not k.endswith("_extra_state")}
    start, out = 0, {}
    for k, v in sd.items():
        out[k] = torch.arange(start, start + v.numel(), dtype=torch.float64).reshape(v.shape)
        start += v.numel()
    return out


@pytest.mark.parametrize("args", [SWIGLU, GELU], ids=["swiglu", "gelu"])
def test_rules_agree_with_megatron_parallel_attributes(args):
    """A key is sharded by our table iff megatron marks the parameter tensor-parallel, on the same dim
    and stride: a new TP layer without a rule (or a rule for a replicated tensor) fails here."""
    torch.manual_seed(0)
    model = LightningDiT(args)
    for name, p in model.named_parameters():
        split = split_of(name)
        is_tp = getattr(p, "tensor_model_parallel", False)
        assert is_tp == (split is not None), name
        if split is not None:
            assert (p.partition_dim, p.partition_stride) == (split.dim, split.stride), name


@pytest.mark.parametrize("args", [SWIGLU, GELU], ids=["swiglu", "gelu"])
@pytest.mark.parametrize("tp", [2, 3, 6])
def test_shard_then_merge_is_exact(args, tp):
    if args.mlp_hidden % tp:
        pytest.skip("MLP width not divisible")
    full = numbered(args)
    shards = [shard_state_dict(full, args, r, tp) for r in range(tp)]
    back = merge_state_dicts(shards)
    assert list(back) == list(full)
    for k in full:
        assert torch.equal(back[k], full[k]), k
    # sharded keys really are split, replicated ones are the very same tensor
    assert shards[1]["blocks.0.attn.qkv.weight"].shape[0] == 3 * args.hidden_size // tp
    assert shards[1]["pos_embed"] is full["pos_embed"]


def test_per_head_and_swiglu_index_logic():
    args, tp = SWIGLU, 3
    full = numbered(args)
    d, hd, lh, hidden = args.hidden_size, args.hidden_size // args.num_heads, args.num_heads // tp, args.mlp_hidden
    for r in range(tp):
        local = shard_state_dict(full, args, r, tp)
        heads = slice(r * lh, (r + 1) * lh)
        qkv = full["blocks.0.attn.qkv.weight"].reshape(3, args.num_heads, hd, d)[:, heads].reshape(-1, d)
        assert torch.equal(local["blocks.0.attn.qkv.weight"], qkv)  # [q_r | k_r | v_r]
        qkv_b = full["blocks.0.attn.qkv.bias"].reshape(3, args.num_heads, hd)[:, heads].reshape(-1)
        assert torch.equal(local["blocks.0.attn.qkv.bias"], qkv_b)
        cols = slice(r * lh * hd, (r + 1) * lh * hd)
        assert torch.equal(local["blocks.0.attn.proj.weight"], full["blocks.0.attn.proj.weight"][:, cols])
        assert torch.equal(local["blocks.0.attn.proj.bias"], full["blocks.0.attn.proj.bias"])
        a, b = full["blocks.1.mlp.w12.weight"].chunk(2)
        part = slice(r * hidden // tp, (r + 1) * hidden // tp)
        assert torch.equal(local["blocks.1.mlp.w12.weight"], torch.cat([a[part], b[part]]))  # [a_r | b_r]
        assert torch.equal(local["blocks.1.mlp.w3.weight"], full["blocks.1.mlp.w3.weight"][:, part])
        rows = full["final_layer.adaLN_modulation.1.weight"].shape[0] // tp
        assert torch.equal(local["final_layer.adaLN_modulation.1.weight"],
                           full["final_layer.adaLN_modulation.1.weight"][r * rows:(r + 1) * rows])


def test_gelu_mlp_index_logic():
    args, tp = GELU, 2
    full = numbered(args)
    local = shard_state_dict(full, args, 1, tp)
    h = args.mlp_hidden // tp
    assert torch.equal(local["blocks.0.mlp.fc1.weight"], full["blocks.0.mlp.fc1.weight"][h:])
    assert torch.equal(local["blocks.0.mlp.fc1.bias"], full["blocks.0.mlp.fc1.bias"][h:])
    assert torch.equal(local["blocks.0.mlp.fc2.weight"], full["blocks.0.mlp.fc2.weight"][:, h:])
    out = full["final_layer.linear.weight"].shape[0] // tp
    assert torch.equal(local["final_layer.linear.weight"], full["final_layer.linear.weight"][out:])


def test_non_divisible_heads_name_the_key():
    full = numbered(SWIGLU)  # 6 heads of 12, MLP 192: TP=4 divides hidden and MLP, not the heads
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight.*num_heads\) = 6 is not divisible by 4"):
        shard_state_dict(full, SWIGLU, 0, 4)
    with pytest.raises(ValueError, match=r"num_heads\) = 6 is not divisible by the tensor parallel size 4"):
        SWIGLU.check_tensor_parallel(4)
    with pytest.raises(ValueError, match=r"final-layer outputs .* = 3"):
        ModelArgs(input_size=4, in_channels=3, hidden_size=48, num_heads=6).check_tensor_parallel(2)
    with pytest.raises(ValueError, match="rank 2 outside"):
        shard_state_dict(full, SWIGLU, 2, 2)
