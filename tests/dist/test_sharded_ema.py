"""The EMA sharded over data-parallel ranks (``parallel.shard_ema``) and ZeRO-3 in the trainer.

On 2 ranks, 3 steps of the digits demo model (``train.ema_decay=0.5``: the EMA moves visibly every step):

* the sharded EMA equals, bit for bit, the whole EMA of the same fp32 weights, recomputed here every step
  from the gathered weights with the trainer's own update (megatron's distributed optimizer, ZeRO-2, ZeRO-3),
  and megatron's sharded EMA equals the whole EMA of the same layout (``parallel.shard_ema=false``);
* a run stopped after step 2 and resumed continues bit-identically (weights and EMA) at the same layout, and on
  one process (the plain engine): the checkpoint holds the full EMA (layout-free);
* every one of these runs equals the one-process plain run within the bounds of ``test_trainer_layouts.py``.

Two 2-rank launches: the first runs every uninterrupted and interrupted run in turn, the second every resume.
"""
import shutil

import pytest
import torch

from tests.dist.harness import run_ranks
from tests.dist.test_trainer_layouts import _max_diff, _single
from tests.train.test_trainer import tiny_config

COMMON = ["train.ema_decay=0.5", "train.log_every=1", "checkpoint.resume=true"]
RUNS = {  # name -> options of its 2-rank runs
    "megatron": ["parallel.engine=megatron", "parallel.distributed_optimizer=true"],  # shard_ema: on by default
    "megatron_whole": ["parallel.engine=megatron", "parallel.distributed_optimizer=true", "parallel.shard_ema=false"],
    "zero2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.engine=deepspeed", "parallel.zero_stage=3"],
}
RESUMED = ("megatron", "zero3")  # the interrupted ones


def _train_and_follow(out_dir, overrides):
    """A run of the trainer, with a whole EMA of its full weights kept beside it (gathered after every step,
    updated with the trainer's own fused op). Returns what the tests compare, on every rank."""
    from sfd_scale.train.ema import _lerp
    from sfd_scale.train.trainer import Trainer

    trainer = Trainer(tiny_config(out_dir, *COMMON, *overrides))
    follow = {k: v.clone() for k, v in trainer.state.full_weights("model").items()}
    step = trainer.train_step

    def step_and_follow(batch):
        metrics = step(batch)
        weights = trainer.state.full_weights("model")
        _lerp([follow[k] for k in sorted(follow)], [weights[k] for k in sorted(follow)], trainer.cfg.train.ema_decay,
              metrics["nonfinite"])
        return metrics

    trainer.train_step = step_and_follow
    summary = trainer.fit()
    held = sum(s.numel() for s in trainer.ema.shards) if trainer.ema.sharded else None
    return {"loss": summary["last_loss"], "model": trainer.state.full_weights("model"),
            "ema": trainer.state.full_weights("ema"), "followed": follow, "sharded": trainer.ema.sharded,
            "resumed": trainer.resumed_from is not None, "held": held,
            "trainable": sum(p.numel() for p in trainer.chunks[0].parameters() if p.requires_grad),
            "module_elements": sum(p.numel() for p in trainer.chunks[0].parameters())}  # ZeRO-3: partitioned


def _ranks(rank, world_size, runs):
    from sfd_scale.parallel.engines import deepspeed as engine

    configure = engine.deepspeed_config

    def every_parameter_partitioned(cfg, dp_size):  # DeepSpeed keeps parameters under 1e5 elements gathered
        config = configure(cfg, dp_size)         # (all of this model's): partition them all, as XXL's are
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return config

    engine.deepspeed_config = every_parameter_partitioned
    return {name: _train_and_follow(out_dir, overrides) for name, out_dir, overrides in runs}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_ema_and_zero3_equal_the_plain_run_and_resume_exactly(tmp_path):
    loss_ref, model_ref, ema_ref = _single(tmp_path / "one", COMMON + ["parallel.engine=plain", "train.max_steps=3"])
    first = [(name, tmp_path / name, RUNS[name] + ["train.max_steps=3"]) for name in RUNS]
    first += [(f"{name}_to2", tmp_path / f"{name}_resumed", RUNS[name] + ["train.max_steps=2"]) for name in RESUMED]
    straight = run_ranks(_ranks, 2, args=(first,), timeout=600)
    for name in RESUMED:  # the step-2 checkpoint, once more for the one-process resume
        shutil.copytree(tmp_path / f"{name}_resumed", tmp_path / f"{name}_moved")
    second = [(name, tmp_path / f"{name}_resumed", RUNS[name] + ["train.max_steps=3"]) for name in RESUMED]
    resumed = run_ranks(_ranks, 2, args=(second,), timeout=600)

    for rank in (0, 1):
        runs = straight[rank]
        assert [runs[n]["sharded"] for n in RUNS] == [True, False, True, True]
        for name in RUNS:
            run = runs[name]
            assert _equal(run["ema"], run["followed"]), f"{name}: sharded EMA vs whole EMA of the same weights"
            assert abs(run["loss"] - loss_ref) <= 1e-6, name
            assert _max_diff(run["model"], model_ref) <= 3e-7 and _max_diff(run["ema"], ema_ref) <= 3e-7, name
            assert _equal(run["model"], straight[0][name]["model"]) and _equal(run["ema"], straight[0][name]["ema"])
        assert _max_diff(runs["megatron"]["ema"], runs["megatron"]["model"]) > 1e-4  # (the EMA is not the weights)
        assert _equal(runs["megatron"]["model"], runs["megatron_whole"]["model"])
        assert _equal(runs["megatron"]["ema"], runs["megatron_whole"]["ema"]), "sharded vs whole EMA, same layout"
        for name in RESUMED:
            again = resumed[rank][name]
            assert again["resumed"] and again["sharded"]
            assert _equal(again["model"], runs[name]["model"]) and _equal(again["ema"], runs[name]["ema"]), name

    trainable = straight[0]["megatron_whole"]["trainable"]
    assert straight[0]["zero3"]["module_elements"] == 0  # ZeRO-3 (every parameter partitioned): nothing gathered
    for name in ("megatron", "zero2", "zero3"):  # each rank keeps the EMA of about half: every element once
        held = [straight[rank][name]["held"] for rank in (0, 1)]
        assert sum(held) == trainable and max(held) < 0.6 * trainable, (name, held, trainable)

    for name in RESUMED:  # the 2-rank checkpoint of step 2 continues on one process
        loss, model, ema = _single(tmp_path / f"{name}_moved", COMMON + ["parallel.engine=plain", "train.max_steps=3"])
        assert loss == pytest.approx(straight[0][name]["loss"], rel=1e-5, abs=1e-6)
        assert _max_diff(model, model_ref) <= 3e-7 and _max_diff(ema, ema_ref) <= 3e-7, name
        log = (tmp_path / f"{name}_moved" / "log.txt").read_text()
        assert "engine plain, TP 1 x PP 1 x DP 1" in log and "resumed from" in log
