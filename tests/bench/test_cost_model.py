"""The CPU cost model: FLOPs as the formula and torch count them, syncs found where they are, meta = real."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from sfd_scale.config import load_config, model_args
from sfd_scale.diffusion.sfd import SFDObjective
from sfd_scale.models.flops import forward_flops
from sfd_scale.models.lightningdit import LightningDiT
from sfd_scale.bench import cost_model
from sfd_scale.bench.dispatch_count import CudaAutocast, OpCounter
from tools.cost_model import main as cost_model_main

TINY = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "train.global_batch_size=4",
        "logging.wandb_mode=disabled", "logging.progress=false", "train.log_every=10"]


def tiny(*extra):
    return load_config(["configs/demo/digits.yaml"], TINY + list(extra))


@pytest.fixture(scope="module")
def counts():
    cfg = tiny("train.precision=bf16")
    return cfg, cost_model.count_step(cfg, 4, "cpu"), cost_model.count_step(cfg, 4, "meta")


def test_gemm_flops_equal_the_formula_less_the_input_gradients_nobody_needs(counts):
    cfg, real, _ = counts
    args, b = model_args(cfg), 4
    parts = forward_flops(args)
    # GEMMs: backward = 2x forward, except the input gradients of the first layers (the latents and the
    # time frequencies need none): the patch embedding's and each time MLP's first linear
    attention = args.depth * 4 * args.grid ** 4 * args.hidden_size
    patch = 2 * args.grid ** 2 * args.patch_size ** 2 * args.in_channels * args.hidden_size
    time_first = sum(2 * 256 * w for w in [args.hidden_size // 2] * 2)
    assert real["gemm_flops"] == b * (3 * (sum(parts.values()) - attention) - patch - time_first)
    # attention: torch counts the fused backward as 2.5x the forward (it recomputes QK^T)
    assert real["attention_flops"] == b * 3.5 * attention
    assert real["model_flops"] == b * 3 * sum(parts.values())


def test_counter_flops_equal_torch_flop_counter():
    cfg = tiny()
    args = model_args(cfg)
    torch.manual_seed(0)
    model = LightningDiT(args).train()
    x = torch.randn(3, args.in_channels, args.input_size, args.input_size)
    t = (torch.rand(3), torch.rand(3))
    counter = OpCounter(torch.device("cpu"))
    with FlopCounterMode(display=False) as reference, counter, CudaAutocast(None):
        model(x, t, torch.randint(0, 10, (3,))).square().mean().backward()
    gemm = sum(c["gemm_flops"] for c in counter.totals.values())
    attention = sum(c["attention_flops"] for c in counter.totals.values())
    assert gemm == reference.get_total_flops() > 0  # torch's counter has no formula for CPU's fused SDPA
    shape = (3, args.num_heads, args.grid ** 2, args.hidden_size // args.num_heads)
    assert attention == args.depth * (sdpa_flop_count(shape, shape, shape)
                                      + sdpa_backward_flop_count(shape, shape, shape, shape))


def test_meta_and_real_tensor_counts_agree(counts):
    _, real, meta = counts
    for key in ("gemm_flops", "attention_flops", "gemm_kernels", "attention_kernels", "blocks", "model_flops"):
        assert real[key] == meta[key], key
    assert real["non_gemm"]["ema"] == meta["non_gemm"]["ema"]
    assert real["blocks"]["count"] == 2 and real["blocks"]["kernels"] > 50
    # the draws are device work on both; a meta run also counts the batch's host -> device copies (latent,
    # label, index), which a CPU run does not dispatch
    assert meta["non_gemm"]["inputs"]["kernels"] == real["non_gemm"]["inputs"]["kernels"] + 3


def test_injected_syncs_are_counted_at_their_caller(monkeypatch):
    plain_objective = SFDObjective.__call__

    def objective_with_syncs(self, model, mb):
        terms = plain_objective(self, model, mb)
        loss, x1 = terms["total"], mb.x1
        value = loss.detach().item()  # SYNC item
        host = x1.cpu()  # SYNC cpu
        picked = x1[x1 > 0]  # SYNC mask
        return terms | {"total": loss + 0 * (value + host.sum().item() + picked.sum())}

    monkeypatch.setattr(SFDObjective, "__call__", objective_with_syncs)
    counted = cost_model.count_step(tiny(), 4, "meta")
    lines = {tag: i + 1 for i, line in enumerate(open(__file__).read().splitlines())
             for tag in ("SYNC item", "SYNC cpu", "SYNC mask") if f"# {tag}" in line}
    where = {(s["op"], s["where"].split(" ")[0]) for s in counted["syncs"]["step"]["where"]}
    here = "tests/bench/test_cost_model.py"
    assert ("_local_scalar_dense", f"{here}:{lines['SYNC item']}") in where
    assert ("copy to host", f"{here}:{lines['SYNC cpu']}") in where
    assert ("boolean-mask indexing", f"{here}:{lines['SYNC mask']}") in where
    # the step itself reads nothing on the host (issue #14): the injected three are all there is; the log
    # step's one read is the trainer's StepWindow; a log interval of 10 steps repeats the step's syncs
    assert len(where) == 3
    syncs = counted["syncs"]
    assert [s["where"].split(" ")[0].split(":")[0] for s in syncs["log_step"]["where"]
            if not s["where"].startswith(here)] == ["sfd_scale/train/step_io.py"]
    assert syncs["per_log_interval"] == 9 * syncs["step"]["count"] + syncs["log_step"]["count"]


@pytest.mark.parametrize("scaled", [False, True])
def test_fused_adamw_writes_its_grads_only_under_a_grad_scale(scaled):
    """torch's fused Adam(W) kernel stores the grads only when unscaling them (``grad_scale`` given): without a
    scale it reads params, grads and both moments and writes params and moments, 7 fp32 words a parameter."""
    params = [torch.nn.Parameter(torch.randn(n, device="meta")) for n in (1000, 24)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, fused=True)
    optimizer.state.update({p: {"step": torch.zeros((), device="meta"), "exp_avg": torch.zeros_like(p),
                                "exp_avg_sq": torch.zeros_like(p)} for p in params})
    if scaled:
        optimizer.grad_scale = torch.ones((), device="meta")
    counter = OpCounter(torch.device("meta"))
    with counter:
        optimizer.step()
    counted = sum(c["bytes"] for c in counter.totals.values())
    steps = 3 * 2 * 4  # the two per-parameter step counters: incremented in place (read, written), then read
    assert counted == 4 * 1024 * (8 if scaled else 7) + steps + (4 if scaled else 0)  # + the scale, read


def test_prediction_arithmetic_with_the_fixed_constants():
    counts = {"micro_batch": 2, "depth": 4, "model_flops": 989e12 * 0.5,
              "gemm_flops": 692e12 * 0.2, "attention_flops": 495e12 * 0.05, "gemm_kernels": 100,
              "attention_kernels": 50,
              "non_gemm": {"step": {"kernels": 800, "bytes": 2.6e12 * 0.1},
                           "optimizer": {"kernels": 40, "bytes": 2.6e12 * 0.02},
                           "ema": {"kernels": 10, "bytes": 2.6e12 * 0.01}},
              "non_gemm_total": {"kernels": 850, "bytes": 2.6e12 * 0.13},
              "blocks": {"kernels": 400, "bytes": 2.6e12 * 0.08}}
    eager = cost_model.predict(counts)
    launch = (850 + 150) * 4e-6
    assert eager["step_s"] == pytest.approx(0.2 + 0.05 + 0.1 + 0.03 + launch)
    assert eager["mfu"] == pytest.approx(0.5 / eager["step_s"])
    # compiled: the 4 blocks' 400 kernels and 0.08 s of traffic become 4 x 20 kernels and 8 x 1e9 bytes
    compiled = cost_model.predict(counts, {"kernels_per_block": 20, "bytes_per_sample_per_block": 1e9})
    assert compiled["kernels"] == 850 - 400 + 80 + 150
    assert compiled["non_gemm_s"] == pytest.approx(0.1 - 0.08 + 8e9 / 2.6e12)
    # the final layer compiled too: its eager 30 kernels / 0.005 s become 6 kernels / 0.001 s
    counts["heads"] = {"final_layer": {"kernels": 30, "bytes": 2.6e12 * 0.005}}
    heads = {"final_layer": {"kernels": 6, "bytes": 2.6e12 * 0.001}}
    both = cost_model.predict(counts, {"kernels_per_block": 20, "bytes_per_sample_per_block": 1e9, "heads": heads})
    assert both["kernels"] == compiled["kernels"] - 24
    assert both["non_gemm_s"] == pytest.approx(compiled["non_gemm_s"] - 0.004)


def test_compiled_block_bytes_extrapolate_to_the_micro_batch():
    runs = {1: {"fused_kernels": 30, "fused_bytes": 500, "extern_other_bytes": 100},
            2: {"fused_kernels": 31, "fused_bytes": 800, "extern_other_bytes": 100, "extern_other_kernels": 2}}
    per = cost_model.compiled_per_block(runs, 4)
    assert per["kernels_per_block"] == 33
    assert per["bytes_per_sample_per_block"] == (600 + 3 * 300) / 4
    # counted at the micro-batch itself: taken as it is
    assert cost_model.compiled_per_block(runs, 2)["bytes_per_sample_per_block"] == 900 / 2


def test_cli_unknown_key_exits_2_with_one_line(capsys):
    assert cost_model_main(["--config", "configs/demo/digits.yaml", "train.no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_key" in err[0]


def test_triton_scheduling_fuses_at_least_as_much_as_the_cpp_backend():
    # both graphs (forward and backward) reach the Triton scheduler on the CPU, without generating kernels
    cfg = tiny("train.precision=bf16")
    triton = cost_model.triton_scheduled_block(cfg, (2,))[2]
    cpp = cost_model.compiled_block(cfg, (2,))[2]
    assert triton["graphs"] == 2 and triton["fused_kernels"] > 0
    assert triton["gemm_kernels"] == cpp["gemm_kernels"]
    assert 0 < triton["fused_bytes"] <= cpp["fused_bytes"]


def test_final_layer_and_repa_projector_are_counted_apart():
    """The modules compiled on CUDA besides the blocks get their own eager counts, forward and backward, which
    the compiled prediction replaces by their Triton-scheduled ones."""
    cfg = tiny("train.precision=bf16", "model.use_repa=true", "model.repa_depth=1", "model.repa_projector_dim=16",
               "model.repa_feature_dim=8")
    real, meta = cost_model.count_step(cfg, 4, "cpu"), cost_model.count_step(cfg, 4, "meta")
    assert set(real["heads"]) == {"final_layer", "repa_projector"} and real["heads"] == meta["heads"]
    step = real["non_gemm"]["step"]
    # each smaller than one block (the backward of the blocks, which runs while the final layer's conditioning
    # gradient is still incomplete, is not theirs)
    assert all(0 < h["kernels"] < real["blocks"]["kernels_per_block"] for h in real["heads"].values())
    assert sum(h["bytes"] for h in real["heads"].values()) + real["blocks"]["bytes"] < step["bytes"]
    scheduled = cost_model.triton_scheduled_heads(cfg, 4)
    assert set(scheduled) == set(real["heads"])
    for name, r in scheduled.items():
        assert r["graphs"] == 2 and 0 < r["fused_kernels"] < real["heads"][name]["kernels"]
        assert 0 < r["fused_bytes"] < real["heads"][name]["bytes"]
    # every linear's forward, input- and weight-gradient GEMMs (the final layer's adaLN linear and linear,
    # the projector's three)
    assert scheduled["final_layer"]["gemm_kernels"] == 2 * 3 and scheduled["repa_projector"]["gemm_kernels"] == 3 * 3


def test_compiled_prediction_falls_back_to_the_cpp_backend(monkeypatch):
    runs = {1: {"fused_kernels": 30, "fused_bytes": 500}, 2: {"fused_kernels": 30, "fused_bytes": 800}}
    monkeypatch.setattr(cost_model, "compiled_block", lambda cfg: runs)
    triton = {1: {"fused_kernels": 20, "fused_bytes": 400}, 2: {"fused_kernels": 20, "fused_bytes": 600}}
    monkeypatch.setattr(cost_model, "triton_scheduled_block", lambda cfg, micro_batches: triton)
    heads = {"final_layer": {"fused_kernels": 5, "fused_bytes": 100, "gemm_kernels": 6, "gemm_bytes": 1000}}
    monkeypatch.setattr(cost_model, "triton_scheduled_heads", lambda cfg, micro_batch: heads)
    out = cost_model._compiled(None, 2)
    assert out["compiled"]["scheduling"] == "triton" and out["compiled"]["bytes_per_sample_per_block"] == 300
    assert out["compiled"]["heads"] == {"final_layer": {"kernels": 5, "bytes": 100}}  # GEMMs stay GEMMs
    assert cost_model._compiled_rows(out)["compiled prediction uses"] == "Triton scheduling"

    def no_driver(cfg, micro_batches):
        raise RuntimeError("0 active drivers")

    monkeypatch.setattr(cost_model, "triton_scheduled_block", no_driver)
    out = cost_model._compiled(None, 2)
    assert out["compiled"] == {**out["compiled_cpp"], "scheduling": "cpp"}
    assert "0 active drivers" in out["compiled_triton_error"]
    assert cost_model._compiled_rows(out)["compiled prediction uses"] == "C++ backend"
