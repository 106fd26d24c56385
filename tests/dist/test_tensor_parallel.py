"""TP=2 on two gloo ranks == TP=1 with identical full weights; the golden forward at TP=2.

Two spawns in all (each ~5 s of launch + import): one runs every parity check on two small models
(SwiGLU / RMSNorm / QK-norm / RoPE / REPA / dual time, and GELU / affine-LayerNorm QK-norm / wo_shift /
learn_sigma / patch 2 / single time) and reports per check, one loads the golden set's official weights.
The TP=1 reference is computed in this (pytest) process on the plain TP=1 path.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sfd_scale.diffusion.sfd import ObjectiveConfig, SFDObjective, SFDSpec
from sfd_scale.models.lightningdit import LightningDiT, ModelArgs, parallel_config
from sfd_scale.models.official import export_official_state_dict, load_official_state_dict
from tests.dist.harness import run_ranks

FORWARD_TOL = LOSS_TOL = 1e-5
GRAD_TOL = 1e-4

CASES = {
    "swiglu_sfd": (ModelArgs(input_size=8, patch_size=1, in_channels=8, hidden_size=64, depth=2, num_heads=4,
                             num_classes=10, use_repa=True, repa_depth=1, repa_projector_dim=16, repa_feature_dim=24),
                   SFDSpec(texture_chans=4, semantic_chans=4, delta_t=0.3)),
    "gelu_plain": (ModelArgs(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                             num_classes=10, use_swiglu=False, use_rmsnorm=False, use_rope=False, wo_shift=True,
                             learn_sigma=True, dual_time_embed=False),
                   SFDSpec(texture_chans=4)),
}


def _inputs(args: ModelArgs, spec: SFDSpec) -> dict:
    g = torch.Generator().manual_seed(5)
    b, c, s = 3, args.in_channels, args.input_size
    inputs = dict(x1=torch.randn(b, c, s, s, generator=g), x0=torch.randn(b, c, s, s, generator=g),
                  y=torch.tensor([1, 4, 9]), t_base=torch.tensor([0.05, 0.6, 1.2 if spec.is_async else 0.9]))
    if args.use_repa:
        inputs["repa_target"] = torch.randn(b, args.grid ** 2, args.repa_feature_dim, generator=g)
    return inputs


def _run(model: LightningDiT, spec: SFDSpec, inputs: dict) -> dict:
    """Eval forward, SFD loss (train mode, label dropout seeded) and named gradients of one model."""
    objective = SFDObjective(spec, ObjectiveConfig())
    t = objective.times(inputs["t_base"])
    with torch.no_grad():
        out = model.eval()(inputs["x1"], t, inputs["y"])
    model.train()
    torch.manual_seed(11)  # label dropout: the same draw on every rank and in the reference
    terms = objective.loss_terms(model, inputs["x1"], inputs["y"], t_base=inputs["t_base"], x0=inputs["x0"],
                                 repa_target=inputs.get("repa_target"))
    model.zero_grad(set_to_none=True)
    terms["total"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"out": out, "loss": terms["total"].detach(), "grads": grads}


def _reference(args: ModelArgs, spec: SFDSpec) -> dict:
    """TP=1 (this process): the seeded init, perturbed full weights, and their forward / loss / grads."""
    torch.manual_seed(3)
    model = LightningDiT(args)
    init = export_official_state_dict(model)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # zero-init gates / final layer would make most gradients exactly zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    full = export_official_state_dict(model)
    inputs = _inputs(args, spec)
    return {"init": init, "full": full, "inputs": inputs, **_run(model, spec, inputs)}


def _tp2_rank(rank, world_size, cases):
    from sfd_scale.parallel.layout import ParallelLayout, initialize
    from sfd_scale.models.tensor_parallel import gather_state_dict, model_tp

    initialize(ParallelLayout(tensor_parallel=2))
    results = {}
    for name, (args, spec, full, inputs) in cases.items():
        torch.manual_seed(3)
        # the same seed as the reference: megatron's CPU init is layout-invariant
        model = LightningDiT(args, parallel_config(tensor_parallel=2))
        assert model_tp(model)[:2] == (rank, 2)
        res = {"init": export_official_state_dict(model)}
        load_official_state_dict(model, full)
        res["exported"] = export_official_state_dict(model)
        res.update(_run(model, spec, inputs))
        res["local_qkv_rows"] = model.blocks[0].attn.qkv.weight.shape[0]
        res["grads"] = gather_state_dict(res["grads"], args)
        results[name] = res
    try:
        LightningDiT(ModelArgs(input_size=4, in_channels=4, hidden_size=48, depth=1, num_heads=3, num_classes=10),
                     parallel_config(tensor_parallel=2))
        results["bad_heads_error"] = None
    except ValueError as err:
        results["bad_heads_error"] = str(err)
    return results


@pytest.fixture(scope="module")
def tp2():
    """(reference per case, [rank0, rank1] results): the single TP=2 spawn of this module."""
    refs = {name: _reference(args, spec) for name, (args, spec) in CASES.items()}
    cases = {name: (args, spec, refs[name]["full"], refs[name]["inputs"]) for name, (args, spec) in CASES.items()}
    return refs, run_ranks(_tp2_rank, 2, args=(cases,))


def _max_err(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_tp1(tp2, case):
    refs, ranks = tp2
    args = CASES[case][0]
    for rank, res in enumerate(ranks):
        assert res[case]["local_qkv_rows"] == 3 * args.hidden_size // 2  # really sharded
        assert _max_err(res[case]["out"], refs[case]["out"]) <= FORWARD_TOL, rank


@pytest.mark.parametrize("case", CASES)
def test_loss_matches_tp1(tp2, case):
    refs, ranks = tp2
    for rank, res in enumerate(ranks):
        assert abs(res[case]["loss"].item() - refs[case]["loss"].item()) <= LOSS_TOL, rank


@pytest.mark.parametrize("case", CASES)
def test_every_gathered_gradient_matches_tp1(tp2, case):
    """Absolute 1e-4, and relative to the gradient's norm where that is below 1 (so small gradients,
    e.g. the QK-norm weights that need an all-reduce over TP, cannot pass by being small). Norms below
    1e-5 count as 1e-5: those gradients are zero up to rounding (the affine k-norm bias shifts every key
    alike, which softmax ignores: its gradient is ~1e-10 of float32 noise in either layout)."""
    refs, ranks = tp2
    ref = refs[case]["grads"]
    for rank, res in enumerate(ranks):
        grads = res[case]["grads"]
        assert set(grads) == set(ref), rank
        for name, g in ref.items():
            norm = g.norm().item()
            assert norm > 0, f"{name}: zero reference gradient, the check would be vacuous"
            assert _max_err(grads[name], g) <= GRAD_TOL * min(1.0, max(norm, 1e-5)), (rank, name)


@pytest.mark.parametrize("case", CASES)
def test_load_export_round_trip_and_seeded_init(tp2, case):
    """Official weights -> TP=2 shards -> all-gathered export is exact, and a TP=2 model built from a seed
    holds exactly the TP=1 model from that seed (megatron CPU init with the qkv / w12 strides)."""
    refs, ranks = tp2
    for res in ranks:
        for which, ref in (("exported", refs[case]["full"]), ("init", refs[case]["init"])):
            assert list(res[case][which]) == list(ref)
            for k, v in ref.items():
                assert torch.equal(res[case][which][k], v), (which, k)


def test_non_divisible_heads_are_a_clear_error(tp2):
    for res in tp2[1]:
        assert res["bad_heads_error"] and "num_heads) = 3 is not divisible by the tensor parallel size 2" \
            in res["bad_heads_error"]


# ----------------------------------------------------------------------------------------------- golden
def _golden_rank(rank, world_size, golden_dir):
    from sfd_scale.parallel.layout import ParallelLayout, initialize
    from sfd_scale.models.tensor_parallel import model_tp
    from tests import golden

    initialize(ParallelLayout(tensor_parallel=2))
    golden_dir = Path(golden_dir)
    entry = golden.config(golden_dir)["models"]["main"]
    model, spec = golden.build(golden_dir, tensor_parallel=2)  # official weights, sharded for this rank on load
    assert model_tp(model)[:2] == (rank, 2)
    g = golden.tensors(golden_dir, entry["forward_file"])
    t = golden.model_time(spec, g)
    with torch.no_grad():
        errs = {"out_eval": golden.max_err(model(g["x"], t, g["y"]), g["out_eval"])}
        model.train()
        model.y_embedder.dropout_prob = 0.0  # as the golden run: train mode, label dropout off
        out = model(g["x"], t, g["y"])
    velocity, proj = out if isinstance(out, tuple) else (out, None)
    errs["train_velocity"] = golden.max_err(velocity, g["out_eval"])
    if "repa_proj_train_subset" in g:
        errs["repa_proj"] = golden.max_err(proj[:, g["repa_token_index"]], g["repa_proj_train_subset"])
    return errs


def test_golden_forward_at_tp2(golden_dir):
    for rank, errs in enumerate(run_ranks(_golden_rank, 2, args=(str(golden_dir),))):
        assert "repa_proj" in errs and len(errs) == 3
        for key, err in errs.items():
            assert err <= FORWARD_TOL, (rank, key, err)
