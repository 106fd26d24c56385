"""Checkpoints are layout-free: a run saved at DP = 2 or TP = 2 continues on one process (and back), with
the loss curve of a run that never changed layout; and every rank refuses to start from scratch over a
checkpoints/ directory none of whose entries verifies."""
import json

import pytest

from tests.dist.harness import run_ranks
from tests.dist.test_trainer_layouts import _max_diff, _single, _train
from tests.train.test_trainer import tiny_config


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


CASES = {  # name -> (options of both parts, options of the 2-rank part)
    "dp2_distopt": (["parallel.engine=megatron", "parallel.distributed_optimizer=true"], []),
    "tp2": (["parallel.engine=megatron", "parallel.distributed_optimizer=false", "optim.eps=1e-3",
             "model.hidden_size=48"], ["parallel.tensor_parallel=2"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_rank_checkpoint_continues_on_one_process(tmp_path, case):
    common, two_ranks = CASES[case]
    common = common + ["train.log_every=1", "checkpoint.resume=true"]
    _, model_ref, ema_ref = _single(tmp_path / "one", common + ["train.max_steps=5"])
    run_ranks(_train, 2, args=(tmp_path / "moved", common + two_ranks + ["train.max_steps=3"]))
    # the 1-process part runs the plain engine: optimizer state moves across engines too
    _, model, ema = _single(tmp_path / "moved", common[1:] + ["parallel.engine=plain", "train.max_steps=5"])
    ref, moved = _losses(tmp_path / "one"), _losses(tmp_path / "moved")
    assert sorted(moved) == [1, 2, 3, 4, 5]
    for step in (4, 5):  # continued on one process: the same curve within rounding
        assert moved[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, moved, ref)
    assert _max_diff(model, model_ref) <= 1e-5 and _max_diff(ema, ema_ref) <= 1e-5
    log = (tmp_path / "moved" / "log.txt").read_text()
    assert "engine plain, TP 1 x PP 1 x DP 1" in log and "resumed from" in log


def _refused(rank, world_size, out_dir, overrides):
    from sfd_scale import checkpoint_store as store
    from sfd_scale.train.trainer import Trainer

    try:
        Trainer(tiny_config(out_dir, *overrides))
    except store.CheckpointError as err:
        return str(err)
    return None


def test_every_rank_refuses_to_start_over_checkpoints_none_of_which_verifies(tmp_path):
    (tmp_path / "checkpoints" / "step_0000002").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n')
    messages = run_ranks(_refused, 2, args=(tmp_path, ["parallel.engine=megatron", "checkpoint.resume=true"]))
    assert messages[0] == messages[1] and "step_0000002: no manifest.json" in messages[0]
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 2, "loss": 1.0}\n'
