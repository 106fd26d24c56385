"""Pipeline parallelism (megatron 1F1B and interleaved schedules) == one process, losses and gradients."""
import pytest
import torch

from sfd_scale.diffusion.sfd import ObjectiveConfig, SFDObjective, SFDSpec
from sfd_scale.models.lightningdit import ModelArgs
from sfd_scale.diffusion.micro_batch import MicroBatch
from sfd_scale.models.lightningdit import check_pipeline_split
from sfd_scale.parallel.pipeline import stage_spec
from tests.dist.harness import run_ranks

SPEC = SFDSpec(texture_chans=4, semantic_chans=2, delta_t=0.3)
ARGS = ModelArgs(input_size=4, in_channels=6, hidden_size=32, depth=4, num_heads=2, num_classes=10,
                 class_dropout_prob=0.0, use_repa=True, repa_depth=2, repa_projector_dim=16, repa_feature_dim=8)
OBJECTIVE = ObjectiveConfig(semantic_weight=2.0, use_cosine_loss=True)


def micro_batches(n=4, b=2):
    g = torch.Generator().manual_seed(7)
    return [MicroBatch(x1=torch.randn(b, 6, 4, 4, generator=g), y=torch.randint(0, 10, (b,), generator=g),
                       t_base=torch.rand(b, generator=g), x0=torch.randn(b, 6, 4, 4, generator=g),
                       repa_target=torch.randn(b, 8, 4, 4, generator=g)) for _ in range(n)]


def full_weights():
    from sfd_scale.models.lightningdit import LightningDiT
    from sfd_scale.models.official import export_official_state_dict

    torch.manual_seed(0)
    model = LightningDiT(ARGS)
    with torch.no_grad():  # non-degenerate: the official init zeroes adaLN and the final layer
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return export_official_state_dict(model)


def reference(weights):
    """One process, no pipeline: mean loss over micro-batches and full-model gradients."""
    from sfd_scale.models.lightningdit import LightningDiT
    from sfd_scale.models.official import load_official_state_dict

    model = LightningDiT(ARGS)
    load_official_state_dict(model, weights)
    model.train()
    objective, mbs = SFDObjective(SPEC, OBJECTIVE), micro_batches()
    total = 0.0
    for mb in mbs:
        terms = objective.loss_terms(model, mb.x1, mb.y, t_base=mb.t_base, x0=mb.x0, repa_target=mb.repa_target)
        (terms["total"] / len(mbs)).backward()
        total += terms["total"].item() / len(mbs)
    return total, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _pipeline_rank(rank, world_size, weights, virtual_stages):
    from sfd_scale.parallel.layout import ParallelLayout, initialize
    from sfd_scale.parallel.pipeline import build_stages, forward_backward, global_key, stage_state_dict

    initialize(ParallelLayout(pipeline_parallel=world_size, virtual_stages=virtual_stages))
    chunks = build_stages(ARGS)
    for chunk in chunks:
        chunk.load_state_dict(stage_state_dict(weights, chunk), strict=False)
        chunk.train()
    out = forward_backward(chunks, micro_batches(), SFDObjective(SPEC, OBJECTIVE))
    grads = {global_key(c, k): p.grad.clone() for c in chunks for k, p in c.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("virtual_stages", [1, 2])
def test_pipeline_matches_single_process(virtual_stages):
    weights = full_weights()
    ref_loss, ref_grads = reference(weights)
    results = run_ranks(_pipeline_rank, 2, args=(weights, virtual_stages))
    # the last stage reports the main terms; the REPA term comes from the stage owning the projector
    # (block index 1: rank 0 without virtual stages, rank 1's first chunk with two)
    repa = [r[0]["repa_loss_aux"] for r in results if "repa_loss_aux" in r[0]]
    assert len(repa) == 1
    assert abs(results[1][0]["total"] + repa[0] - ref_loss) <= 1e-6
    # the logged terms: the last stage's, the REPA one where the projector is (the engine sums them over stages)
    last = results[1][0]
    assert [r[0]["loss_repa"] for r in results if "loss_repa" in r[0]] == repa
    mse = (4 * last["loss_texture"] + 2.0 * 2 * last["loss_semantic"]) / 6
    assert abs(mse + last["loss_cos"] - last["total"]) <= 1e-6
    grads = {}
    for _, rank_grads in results:
        assert not set(grads) & set(rank_grads), "a parameter lives on two stages"
        grads.update(rank_grads)
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        assert (grads[name] - g).abs().max().item() <= 1e-6, name


def test_stage_split_and_errors():
    assert [stage_spec(4, 2, r).blocks(4) for r in (0, 1)] == [range(0, 2), range(2, 4)]
    chunks = [stage_spec(8, 2, r, 2, v) for v in (0, 1) for r in (0, 1)]
    assert [(c.first_block, c.pre_process, c.post_process) for c in chunks] == [
        (0, True, False), (2, False, False), (4, False, False), (6, False, True)]
    with pytest.raises(ValueError, match="not divisible"):
        check_pipeline_split(6, 2, 2)


def _golden_pp_rank(rank, world_size, golden_dir):
    """Official weights split over 2 stages; stage 0's packed activations go to stage 1 by send / recv."""
    import torch.distributed as dist

    from sfd_scale.parallel.layout import ParallelLayout, initialize
    from sfd_scale.parallel.pipeline import build_stages, stage_state_dict
    from tests import golden

    initialize(ParallelLayout(pipeline_parallel=world_size))
    entry = golden.config(golden_dir)["models"]["main"]
    from sfd_scale.models.official import args_from_official, read_checkpoint, sfd_spec_from_official

    (chunk,) = build_stages(args_from_official(**entry["kwargs"]))
    chunk.load_state_dict(stage_state_dict(read_checkpoint(golden_dir / entry["weights_file"]), chunk), strict=False)
    chunk.eval()
    g = golden.tensors(golden_dir, entry["forward_file"])
    t = golden.model_time(sfd_spec_from_official(**entry["kwargs"]), g)
    with torch.no_grad():
        if rank == 0:
            dist.send(chunk(g["x"], t, g["y"]).contiguous(), dst=1)
            return None
        packed = torch.empty(chunk.args.grid ** 2 + 1, g["x"].shape[0], chunk.args.hidden_size)
        dist.recv(packed, src=0)
        chunk.set_input_tensor(packed)
        return golden.max_err(chunk(None), g["out_eval"])


def test_golden_forward_at_pp2(golden_dir):
    assert run_ranks(_golden_pp_rank, 2, args=(golden_dir,))[1] <= 1e-5
