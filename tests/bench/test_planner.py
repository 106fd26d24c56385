"""The layout planner (``sfd_scale/bench/planner.py``) against CPU runs of small models.

"Measured peak" here: the largest number of bytes held at once by CPU tensor storages during two real
training steps (``Trainer.train_step``, plain engine, one process, fp32, synthetic data) of the model,
counted by ``planner.LiveTensorBytes``: the parameters and the EMA copy made before the steps, plus every
storage an aten op creates during them (activations, gradients, Adam state created in the first step,
temporaries, the data batch) from its creation until it is freed. It is what an allocator without
caching or rounding would have to hold; the planner's per-GPU total (weights + grads + optimizer + EMA +
activations measured on the meta device) must be within 10 % of it.
"""
import dataclasses
import tempfile

import pytest
import torch

from sfd_scale.bench.cost_model import counting_config
from sfd_scale.bench.planner import (Layout, LiveTensorBytes, candidate_layouts, layout_memory, markdown_table,
                                     measure_activations, plan, stage_activation_bytes, stage_parameter_counts,
                                     state_bytes)
from sfd_scale.config import load_config, model_args
from sfd_scale.models.summary import build_meta
from sfd_scale.train.trainer import Trainer

SMALL = "configs/bench/cpu_small.yaml"


def measured_peak(cfg, micro_batch: int) -> int:
    """Peak live CPU tensor bytes of two training steps of ``cfg`` at ``micro_batch`` (module docstring)."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = counting_config(cfg, micro_batch, tmp)
        trainer = Trainer(cfg, device=torch.device("cpu"))
        batches = iter(trainer.loader())
        tracker = LiveTensorBytes("cpu")
        tracker.track([list(trainer.model.parameters()), list(trainer.ema.model.parameters())])
        with tracker:
            for _ in range(2):
                trainer.train_step(next(batches))
        return tracker.peak


CASES = {  # name: (config overrides, micro-batch)
    "plain": ([], 16),
    "repa": (["model.use_repa=true"], 16),
    "checkpointing": (["train.activation_checkpointing=true"], 32),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_planner_total_within_10_percent_of_measured_cpu_peak(case):
    overrides, micro_batch = CASES[case]
    cfg = load_config([SMALL], overrides)
    result = plan(cfg, gpus=1, gpu_mem_gb=80, micro_batch=micro_batch)
    (row,) = [r for r in result["rows"] if r["layout"].engine == "plain"]
    peak = measured_peak(cfg, micro_batch)
    assert abs(row["total"] - peak) / peak < 0.10, (case, row, peak)


def test_activations_on_meta_equal_activations_on_cpu():
    cfg = load_config([SMALL], ["model.use_repa=true"])
    meta, cpu = measure_activations(cfg, 8, "meta"), measure_activations(cfg, 8, "cpu")
    for key in ("outside", "replicated", "input", "depth"):
        assert meta[key] == cpu[key], key
    assert meta["split"] == pytest.approx(cpu["split"], rel=1e-3)  # 0-dim scalars differ in the attention


def test_stage_counts_add_up_to_the_model_and_split_by_tp():
    cfg = load_config([SMALL])
    total = sum(p.numel() for p in build_meta(model_args(cfg)).parameters())
    assert stage_parameter_counts(cfg, 1, 1)[0]["all"] == total
    tp2 = stage_parameter_counts(cfg, 2, 1)[0]["all"]
    assert total / 2 < tp2 < total  # blocks split, embedders and norms replicated
    pp2 = stage_parameter_counts(cfg, 1, 2)
    assert sum(s["all"] for s in pp2) == total and all(s["all"] for s in pp2)


def test_distributed_optimizer_shards_optimizer_state_over_dp():
    params = {"all": 1000, "trainable": 1000}
    replicated = state_bytes(Layout(1, 1, 4, "megatron"), params, bf16=True)
    sharded = state_bytes(Layout(1, 1, 4, "megatron", distributed_optimizer=True), params, bf16=True)
    assert replicated == {"weights": 2000, "grads": 4000, "optimizer": 12000, "ema": 4000}
    assert sharded["optimizer"] == 3000 and sharded["weights"] == 2000
    zero1 = state_bytes(Layout(1, 1, 4, "deepspeed", zero_stage=1), params, bf16=True)
    zero2 = state_bytes(Layout(1, 1, 4, "deepspeed", zero_stage=2), params, bf16=False)
    assert zero1["grads"] == 2000 + 1000 and zero1["optimizer"] == 3000
    assert zero2["grads"] == 1000 and zero2["optimizer"] == 2000
    zero3 = state_bytes(Layout(1, 1, 4, "deepspeed", zero_stage=3, sharded_ema=True), params, bf16=True)
    assert zero3 == {"weights": 500, "grads": 1000, "optimizer": 3000, "ema": 1000}


def test_a_sharded_ema_counts_its_trainable_part_over_dp():
    params = {"all": 1000, "trainable": 800}  # 200 frozen (pos_embed): copied whole
    sharded = state_bytes(Layout(1, 1, 4, "megatron", distributed_optimizer=True, sharded_ema=True), params, False)
    assert sharded["ema"] == 4 * 800 / 4 + 4 * 200
    cfg = load_config([SMALL])
    layouts = {(lay.name(), lay.dp): lay.sharded_ema for lay in candidate_layouts(cfg, 2)}
    # parallel.shard_ema unset: sharded where the optimizer shards its masters over DP > 1, always at ZeRO-3
    assert layouts[("megatron dist-opt", 2)] and layouts[("deepspeed ZeRO-2", 2)] and layouts[("deepspeed ZeRO-3", 2)]
    assert not layouts[("megatron", 2)] and not layouts[("megatron", 1)]
    off = load_config([SMALL], ["parallel.shard_ema=false"])
    layouts = {(lay.name(), lay.dp): lay.sharded_ema for lay in candidate_layouts(off, 2)}
    assert not layouts[("megatron dist-opt", 2)] and layouts[("deepspeed ZeRO-3", 2)]


def test_candidates_follow_the_split_rules_and_the_table_lists_them():
    cfg = load_config([SMALL])  # 4 heads, depth 4, 6 output channels
    layouts = candidate_layouts(cfg, 8)
    assert {(lay.tp, lay.pp, lay.dp) for lay in layouts} >= {(1, 1, 8), (2, 2, 2), (2, 4, 1)}
    assert all(lay.tp <= 2 and lay.pp <= 4 for lay in layouts)  # TP = 4 does not divide the 6 outputs
    assert all(lay.tp == lay.pp == 1 for lay in layouts if lay.engine == "deepspeed")
    result = plan(cfg, gpus=8, gpu_mem_gb=80, micro_batch=4)
    table = markdown_table(result)
    assert table.count("\n| ") == len(layouts) + 1 and "| 2 | 2 | 2 | megatron dist-opt |" in table
    acts = result["activations_measured"]
    one = layout_memory(cfg, Layout(1, 1, 8, "megatron"), acts, 4)["activations"]
    tp2 = layout_memory(cfg, Layout(2, 1, 4, "megatron"), acts, 4)["activations"]
    ckpt = layout_memory(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=True)),
                         Layout(1, 1, 8, "megatron"), acts, 4)["activations"]
    assert tp2 < one and ckpt < one


def test_tool_appends_the_command_and_one_table_per_gpu_count(tmp_path):
    from tools.plan_layout import main

    out = tmp_path / "plan.md"
    assert main(["--config", SMALL, "--gpus", "2", "--gpus", "4", "--micro-batch", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "--gpus 2 --gpus 4" in text and "2 GPUs of 80 GB" in text and "4 GPUs of 80 GB" in text
    assert "| 2 | 1 | 2 | megatron dist-opt |" in text


def test_the_first_pipeline_stage_holds_pp_micro_batches_of_its_blocks():
    acts = {"replicated": 10, "split": 20, "input": 1, "outside": 5, "depth": 4}
    assert stage_activation_bytes(acts, 2, 1, 0, False, 8) == 4 * 20 + 5
    assert stage_activation_bytes(acts, 1, 2, 0, False, 8) == 2 * (2 * 30 + 5)  # 2 blocks, 2 in flight
    assert stage_activation_bytes(acts, 1, 2, 1, False, 8) == 2 * 30 + 5       # last stage: 1 in flight
    assert stage_activation_bytes(acts, 1, 2, 0, True, 8) == 2 * (2 * 1 + 5) + 30
