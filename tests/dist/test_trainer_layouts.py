"""The one trainer loop under other layouts: DP = 2 and TP = 2 train what one process trains."""

import json

import pytest

from tests.dist.harness import run_ranks
from tests.train.test_trainer import tiny_config


def _train(rank, world_size, out_dir, overrides):
    from sfd_scale.train.trainer import Trainer

    trainer = Trainer(tiny_config(out_dir, *overrides))
    summary = trainer.fit()
    # full weights gathered over TP and pipeline stages (what a checkpoint holds)
    return summary["last_loss"], trainer.state.full_weights("model"), trainer.state.full_weights("ema")


def _single(out_dir, overrides):
    from sfd_scale.parallel.layout import destroy

    try:
        return _train(0, 1, out_dir, overrides)
    finally:
        destroy()


def _assert_same_logged_terms(run, reference, steps, rel):
    """metrics.jsonl's loss terms (issue #18) at ``steps`` (log lines over the same window of steps in both)
    equal those of the one-process run: every layout logs the same means over the global batch (rank 0
    writes them; under PP they come from the last stage)."""
    def terms(out_dir):
        rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: [r[k] for k in ("loss_texture", "loss_semantic", "loss_cos")] for r in rows}

    got, want = terms(run), terms(reference)
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=rel), step


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_data_parallel_trainer_matches_one_process_and_resumes(tmp_path):
    common = ["parallel.engine=megatron", "parallel.distributed_optimizer=true", "train.max_steps=4"]
    loss1, model1, ema1 = _single(tmp_path / "dp1", common)
    # DP = 2: 3 steps, then a resumed run to 4 (exercises per-rank optimizer shards in the checkpoint)
    run_ranks(_train, 2, args=(tmp_path / "dp2", common[:-1] + ["train.max_steps=3"]))
    results = run_ranks(_train, 2, args=(tmp_path / "dp2", common[:-1] + ["train.max_steps=4",
                                                                         "checkpoint.resume=true"]))
    for loss2, model2, ema2 in results:
        assert abs(loss2 - loss1) <= 1e-6
        assert _max_diff(model1, model2) <= 3e-7 and _max_diff(ema1, ema2) <= 3e-7
    _assert_same_logged_terms(tmp_path / "dp2", tmp_path / "dp1", steps=[2], rel=1e-5)
    from sfd_scale import checkpoint_store as store

    newest = store.latest(tmp_path / "dp2")
    assert store.manifest(newest)["layout"]["data_parallel"] == 2
    assert {"optim/exp_avg/blocks.0.attn.qkv.weight", "rng/rank_00001"} <= set(store.stored_keys(newest))


def test_tensor_parallel_trainer_matches_one_process(tmp_path):
    common = ["parallel.engine=megatron", "parallel.distributed_optimizer=false", "train.max_steps=2",
              "optim.eps=1e-3", "model.hidden_size=48"]
    # hidden 48: SwiGLU width 128 splits over 2 ranks; a large eps keeps Adam from amplifying ~1e-7 TP noise
    loss1, model1, _ = _single(tmp_path / "tp1", common)
    results = run_ranks(_train, 2, args=(tmp_path / "tp2", common + ["parallel.tensor_parallel=2"]))
    for loss2, model2, _ in results:
        assert abs(loss2 - loss1) <= 1e-5
        assert set(model2) == set(model1) and _max_diff(model1, model2) <= 1e-5


def test_pipeline_trainer_matches_one_process_and_resumes(tmp_path):
    """PP = 2 with 2 virtual stages (4 blocks -> 4 chunks), 2 micro-batches, REPA off (digits data)."""
    common = ["parallel.engine=megatron", "parallel.distributed_optimizer=false", "model.depth=4",
              "train.micro_batch_size=8", "train.sample_every=0"]
    loss1, model1, ema1 = _single(tmp_path / "pp1", common + ["train.max_steps=3"])
    pp = common + ["parallel.pipeline_parallel=2", "parallel.virtual_stages=2"]
    run_ranks(_train, 2, args=(tmp_path / "pp2", pp + ["train.max_steps=2"]))
    results = run_ranks(_train, 2, args=(tmp_path / "pp2", pp + ["train.max_steps=3", "checkpoint.resume=true"]))
    for loss2, model2, ema2 in results:
        assert abs(loss2 - loss1) <= 1e-6
        assert set(model2) == set(model1) and _max_diff(model1, model2) <= 3e-7 and _max_diff(ema1, ema2) <= 3e-7
    _assert_same_logged_terms(tmp_path / "pp2", tmp_path / "pp1", steps=[2, 3], rel=1e-5)


def test_tensor_and_pipeline_parallel_step_matches_one_process(tmp_path):
    """TP = 2 x PP = 2 on 4 ranks: one full training step equals the single-process step."""
    common = ["parallel.engine=megatron", "parallel.distributed_optimizer=false", "train.max_steps=1",
              "model.hidden_size=48", "optim.eps=1e-3", "train.micro_batch_size=8"]
    loss1, model1, _ = _single(tmp_path / "one", common)
    results = run_ranks(_train, 4, args=(tmp_path / "tp2pp2", common + ["parallel.tensor_parallel=2",
                                                                         "parallel.pipeline_parallel=2"]))
    for loss2, model2, _ in results:
        assert abs(loss2 - loss1) <= 1e-5
        assert set(model2) == set(model1) and _max_diff(model1, model2) <= 1e-5


def _signal_on_rank_1(rank, world_size, out_dir, overrides):
    from sfd_scale.train.trainer import Trainer

    trainer = Trainer(tiny_config(out_dir, *overrides))
    step = trainer.train_step

    def step_then_signal(batch):  # only rank 1 sees the signal, while step 2 runs
        out = step(batch)
        if rank == 1 and trainer.step == 2:
            trainer.control.on_signal(10, None)  # SIGUSR1
        return out

    trainer.train_step = step_then_signal
    summary = trainer.fit()
    return summary["steps"], summary["exit_status"]


def test_ranks_agree_on_a_stop_signal_every_stop_check_every_steps(tmp_path):
    """The signal reaches rank 1 at step 2; the ranks compare notes at step 3 (train.stop_check_every=3) and
    both stop there with a checkpoint and the requeue status."""
    from sfd_scale.train.trainer import REQUEUE_EXIT

    common = ["parallel.engine=megatron", "train.max_steps=6", "train.stop_check_every=3"]
    results = run_ranks(_signal_on_rank_1, 2, args=(tmp_path, common))
    assert results == [(3, REQUEUE_EXIT), (3, REQUEUE_EXIT)]
    assert "stopping at step 3: signal received by another rank" in (tmp_path / "log.txt").read_text()
