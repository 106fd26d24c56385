"""Checkpoints are layout-free: a run saved at DP = 2 or TP = 2 continues on one process (and back), with
the loss curve of a run that never changed layout."""
import json

import pytest

from tests.dist.harness import run_ranks
from tests.dist.test_trainer_layouts import _max_diff, _single, _train


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
