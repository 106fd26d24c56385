"""Eight ranks: TP = 2 x PP = 2 x DP = 2 and DP = 8 with the distributed optimizer train what one process
trains, and a checkpoint written on the 8 ranks continues on 2 ranks (TP = 2), then on one process, along the
loss curve of the run that never changed layout. Bounds are those of ``test_trainer_layouts``: the DP ones for
DP = 8, the TP ones (and the TP settings: hidden 48, Adam eps 1e-3) wherever a layout splits over TP."""
import shutil

import pytest

from sfd_scale import checkpoint_store as store
from tests.dist.harness import run_ranks
from tests.dist.test_resume_layouts import _losses
from tests.dist.test_trainer_layouts import _assert_same_logged_terms, _max_diff, _single, _train

LOGGED = ["parallel.engine=megatron", "train.log_every=1", "checkpoint.every=2"]
# as test_trainer_layouts' TP tests: SwiGLU width 128 splits over 2 ranks; a large eps keeps Adam from amplifying
# ~1e-7 TP noise
TP_SETTINGS = LOGGED + ["parallel.distributed_optimizer=false", "optim.eps=1e-3", "model.hidden_size=48"]
# 16 samples: 8 per DP rank in 2 micro-batches of 4 through the 2 pipeline stages; DP ranks 0 and 1 each shard
# the Adam state of their TP x PP part
THREE_D = ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "parallel.distributed_optimizer=true",
           "train.micro_batch_size=4"]
# DP = 8: 2 samples per rank; the distributed optimizer splits each Adam state over the 8 ranks. Its reference
# keeps the settings (and bounds) of test_trainer_layouts' DP test: Adam's default eps, hidden 32.
DP8 = LOGGED + ["parallel.distributed_optimizer=true", "train.max_steps=3"]


def _stored(out_dir, step, which):
    """The full tensors under ``which`` ('model', 'ema', or 'optim': 'exp_avg/<name>' ...) of the checkpoint of
    ``step``, as any layout reads them: the layout-free checkpoint gathers what the ranks held."""
    return store.read_weights(store.checkpoint_dir(out_dir, step), which)


def _assert_same_run(run, reference, steps, loss_bound, bound):
    """The per-step losses of ``run`` equal the reference's at ``steps``, and so does what the checkpoint of the
    last of them holds: weights, EMA and Adam's moments (of the gradients' order, < 0.05 here: the same bound)."""
    got, want = _losses(run), _losses(reference)
    for step in steps:
        assert abs(got[step] - want[step]) <= loss_bound, (step, got, want)
    for which in ("model", "ema", "optim"):
        mine, ref = _stored(run, steps[-1], which), _stored(reference, steps[-1], which)
        assert set(mine) == set(ref) and _max_diff(mine, ref) <= bound, which


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The uninterrupted one-process run with the TP settings: 4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("one_process")
    _single(out, TP_SETTINGS + ["train.max_steps=4"])
    return out


def _train_in_turn(rank, world_size, runs):
    """Several trainings on the same ranks, one after the other, megatron's groups rebuilt for each layout (the
    process group stays): one launch of 8 processes (~8 s of imports each) serves both 8-rank layouts."""
    from megatron.core import parallel_state

    for out_dir, overrides in runs:
        _train(rank, world_size, out_dir, overrides)
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def eight_ranks(tmp_path_factory):
    """One launch of 8 ranks: TP = 2 x PP = 2 x DP = 2 for 2 steps (a checkpoint at 2), then DP = 8 for 3."""
    out = {name: tmp_path_factory.mktemp(name) for name in ("tp2_pp2_dp2", "dp8")}
    runs = [(out["tp2_pp2_dp2"], TP_SETTINGS + THREE_D + ["train.max_steps=2"]), (out["dp8"], DP8)]
    run_ranks(_train_in_turn, 8, args=(runs,), timeout=600)
    return out


def test_tp2_pp2_dp2_trainer_matches_one_process(eight_ranks, one_process):
    three_d = eight_ranks["tp2_pp2_dp2"]
    _assert_same_run(three_d, one_process, steps=[1, 2], loss_bound=1e-5, bound=1e-5)
    _assert_same_logged_terms(three_d, one_process, steps=[1, 2], rel=1e-5)
    assert "TP 2 x PP 2 x DP 2" in (three_d / "log.txt").read_text()
    newest = store.checkpoint_dir(three_d, 2)
    assert store.manifest(newest)["layout"]["world_size"] == 8
    assert {f"rng/rank_{r:05d}" for r in range(8)} <= set(store.stored_keys(newest))


def test_data_parallel_8_distributed_optimizer_matches_one_process(tmp_path, eight_ranks):
    _single(tmp_path / "one", DP8)
    dp8 = eight_ranks["dp8"]
    _assert_same_run(dp8, tmp_path / "one", steps=[1, 2, 3], loss_bound=1e-6, bound=3e-7)
    _assert_same_logged_terms(dp8, tmp_path / "one", steps=[1, 2, 3], rel=1e-5)
    assert store.manifest(store.checkpoint_dir(dp8, 3))["layout"]["data_parallel"] == 8


def test_eight_rank_checkpoint_continues_on_two_ranks_then_one_process(tmp_path, eight_ranks, one_process):
    """8 ranks (steps 1-2) -> TP = 2 on 2 ranks (step 3) -> the plain engine on one process (step 4)."""
    moved = tmp_path / "moved"
    shutil.copytree(eight_ranks["tp2_pp2_dp2"], moved)
    resume = TP_SETTINGS + ["checkpoint.resume=true"]
    run_ranks(_train, 2, args=(moved, resume + ["parallel.tensor_parallel=2", "train.max_steps=3"]))
    _single(moved, resume + ["parallel.engine=plain", "train.max_steps=4"])
    assert sorted(_losses(moved)) == [1, 2, 3, 4]
    # the TP bounds (test_resume_layouts' TP case allows rel 1e-5 on the loss: ~3e-5 at these losses of ~3)
    _assert_same_run(moved, one_process, steps=[3, 4], loss_bound=1e-5, bound=1e-5)
    log = (moved / "log.txt").read_text()
    for layout in ("TP 2 x PP 1 x DP 1", "engine plain, TP 1 x PP 1 x DP 1"):
        assert layout in log
    assert log.count("resumed from") == 2
