"""The documented FLOP formula (models/flops.py) against torch.utils.flop_counter on the real model."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sfd_scale.config import load_config, model_args, objective_config, sfd_spec
from sfd_scale.diffusion.sfd import SFDObjective
from sfd_scale.models.flops import forward_flops, sampling_flops_per_call, training_flops_per_image
from sfd_scale.models.lightningdit import LightningDiT

SMALL = ["data.path=unused", "model.use_repa=true", "model.depth=2", "model.hidden_size=128", "model.num_heads=2",
         "model.repa_projector_dim=64", "model.repa_feature_dim=32"]


def _config(*overrides):
    return load_config(["configs/experiments/sfd_xxl.yaml"], ["data.path=unused", *overrides])


def test_sfd_xxl_is_about_1_09_tflop_per_training_image():
    args = model_args(_config("model.use_repa=true"))
    assert (args.hidden_size, args.depth, args.grid ** 2) == (1536, 24, 256)
    assert training_flops_per_image(args) == pytest.approx(1.09e12, rel=0.005)
    assert forward_flops(args)["REPA projector"] > 0 and forward_flops(args, training=False)["REPA projector"] == 0


@pytest.mark.parametrize("swiglu", [True, False])
def test_formula_matches_flop_counter(swiglu):
    cfg = _config(*SMALL, f"model.use_swiglu={swiglu}")
    args = model_args(cfg)
    model = LightningDiT(args)
    objective = SFDObjective(sfd_spec(cfg), objective_config(cfg))
    b = 4
    x1, y = torch.randn(b, args.in_channels, 16, 16), torch.randint(0, 1000, (b,))
    repa = torch.randn(b, args.grid ** 2, args.repa_feature_dim)
    # the math SDPA path: its batched matmuls are counted (the CPU flash kernel has no FLOP rule)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as train_count:
            objective.loss_terms(model.train(), x1, y, repa_target=repa)["total"].backward()
        with FlopCounterMode(display=False) as eval_count, torch.no_grad():
            model.eval()(x1, (torch.rand(b), torch.rand(b)), y)
    assert eval_count.get_total_flops() / b == sampling_flops_per_call(args)  # matmuls counted exactly
    assert train_count.get_total_flops() / b == pytest.approx(training_flops_per_image(args), rel=0.05)
