"""Fault tolerance of the trainer: a requeue signal, a time budget, non-finite losses, and SIGKILL at random
moments (also during an asynchronous save) all end in the run an uninterrupted job produces (pruning:
tests/test_checkpoint_dirs.py; damaged checkpoints and failed saves: tests/train/test_checkpoint_damage.py)."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sfd_scale import checkpoint_store as store
from sfd_scale.train.trainer import REQUEUE_EXIT, Trainer
from tests.train.test_trainer import TINY, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def losses(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in rows}) == len(rows), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows}


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every tensor bit-identical (weights, EMA, optimizer state), and the same counters."""
    keys_a, keys_b = store.stored_keys(a), store.stored_keys(b)
    tensors = sorted(k for k in keys_a if k.split("/")[0] in ("model", "ema", "optim"))
    assert tensors == sorted(k for k in keys_b if k.split("/")[0] in ("model", "ema", "optim"))
    assert any(k.startswith("optim/exp_avg_sq/") for k in tensors)
    sa, sb = store.empty_like_stored(a, tensors, keys_a), store.empty_like_stored(b, tensors, keys_b)
    store.load(a, sa)
    store.load(b, sb)
    bad = [k for k in tensors if not torch.equal(sa[k], sb[k])]
    assert not bad, f"differ: {bad[:5]}"
    assert store.read_object(a, "counters") == store.read_object(b, "counters")
    ta, tb = store.read_object(a, "trainer"), store.read_object(b, "trainer")
    assert ta["step"] == tb["step"] and ta["data_position"] == tb["data_position"]


# ----------------------------------------------------------------------------------------------- in process
def signal_during(trainer: Trainer, at_step: int) -> None:
    """SIGUSR1 arrives while step ``at_step`` runs (sent from inside the trainer's step)."""
    step = trainer.train_step

    def step_then_signal(batch):
        out = step(batch)
        if trainer.step == at_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    trainer.train_step = step_then_signal


def test_signal_checkpoints_exits_for_requeue_and_resumes_exactly(tmp_path):
    common = ["train.max_steps=6", "train.log_every=1", "checkpoint.resume=true"]
    Trainer(tiny_config(tmp_path / "straight", *common)).fit()
    trainer = Trainer(tiny_config(tmp_path / "run", *common))
    signal_during(trainer, 3)
    summary = trainer.fit()
    assert summary["exit_status"] == REQUEUE_EXIT and summary["steps"] == 3
    assert store.latest(tmp_path / "run").name == "step_0000003"
    assert "stopping at step 3: signal SIGUSR1" in (tmp_path / "run" / "log.txt").read_text()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored
    resumed = Trainer(tiny_config(tmp_path / "run", *common))
    assert resumed.step == 3
    assert resumed.fit()["exit_status"] == 0
    assert_same_checkpoint(store.latest(tmp_path / "run"), store.latest(tmp_path / "straight"))
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")


# wall-clock rates, the only metrics.jsonl columns a resume may change: steps/s, and the window's images/s, model
# TFLOP/s per device and share of time waiting for data (step_io.WindowClock, issue #18)
TIME_COLUMNS = ("steps/s", "images_per_s", "tflops_per_s", "data_wait_frac")
# the same kind, only on a GPU: MFU (a wall-clock rate over the device's peak) and the process's peak memory
GPU_TIME_COLUMNS = ("mfu", "peak_mem_gb")


def metrics_rows(out: Path) -> list:
    """metrics.jsonl's lines without the wall-clock columns, as text: compared bit for bit."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(column in row for row in rows for column in TIME_COLUMNS)
    return [json.dumps({k: v for k, v in row.items() if k not in TIME_COLUMNS + GPU_TIME_COLUMNS}) for row in rows]


@pytest.mark.parametrize("stop", ["signal", "time_budget"])
def test_resume_between_log_steps_logs_the_uninterrupted_metrics(tmp_path, stop):
    """Issue #16 case 7: stopped between two log steps (step 3 of log_every=2, after a skipped step; or step 1
    by the time budget) and resumed, the run's metrics.jsonl equals the uninterrupted run's, loss_avg and
    skipped_steps included: the steps read since the last log step travel in the checkpoint."""
    common = ["train.max_steps=6", "train.log_every=2", "checkpoint.resume=true", "checkpoint.every=0"]
    straight = Trainer(tiny_config(tmp_path / "straight", *common))
    _poison(straight, {3})
    straight.fit()
    first = Trainer(tiny_config(tmp_path / "run", *common,
                                *(["train.time_budget_s=1e-6"] if stop == "time_budget" else [])))
    _poison(first, {3})
    if stop == "signal":
        signal_during(first, 3)
    summary = first.fit()
    assert summary["exit_status"] == REQUEUE_EXIT and summary["steps"] == (3 if stop == "signal" else 1)
    resumed = Trainer(tiny_config(tmp_path / "run", *common))
    assert resumed.step == summary["steps"] and resumed.window.records  # the unlogged steps came back
    _poison(resumed, {3})
    assert resumed.fit()["exit_status"] == 0
    rows = metrics_rows(tmp_path / "run")
    assert [json.loads(r)["step"] for r in rows] == [2, 4, 6] and "skipped_steps" in rows[1]
    assert all("loss_texture" in r and "loss_semantic" in r and "loss_cos" in r for r in rows)  # compared too
    assert rows == metrics_rows(tmp_path / "straight")


def test_time_budget_stops_with_a_checkpoint(tmp_path):
    summary = Trainer(tiny_config(tmp_path, "train.max_steps=6", "train.time_budget_s=1e-6")).fit()
    assert summary["exit_status"] == REQUEUE_EXIT and summary["steps"] == 1
    assert store.latest(tmp_path).name == "step_0000001"
    assert "train.time_budget_s=1e-06 reached" in (tmp_path / "log.txt").read_text()


def _poison(trainer, bad_steps):
    """NaN losses while computing the given (1-based) steps; records the weights after every step."""
    objective, step = trainer.objective, trainer.train_step
    after = {}

    def poisoned(model, mb):
        terms = objective(model, mb)
        return terms | {"total": terms["total"] * float("nan")} if trainer.step + 1 in bad_steps else terms

    def recording(batch):
        out = step(batch)
        after[trainer.step] = tuple({k: v.clone() for k, v in m.state_dict().items() if torch.is_tensor(v)}
                                    for m in (trainer.model, trainer.ema.model))
        return out

    trainer.objective, trainer.train_step = poisoned, recording
    return after


def test_nonfinite_loss_skips_the_step_and_continues(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=5", "train.log_every=1"))
    after = _poison(trainer, {3})
    summary = trainer.fit()
    assert summary["exit_status"] == 0 and summary["nonfinite_steps"] == 1 and summary["steps"] == 5
    for which in (0, 1):  # model, EMA: step 3 changed nothing, step 4 did
        assert all(torch.equal(after[3][which][k], after[2][which][k]) for k in after[2][which])
        assert not all(torch.equal(after[4][which][k], after[3][which][k]) for k in after[3][which])
    assert "step 3: skipped, no update (non-finite loss" in (tmp_path / "log.txt").read_text()
    assert all(torch.isfinite(v).all() for v in after[5][0].values())


def test_too_many_nonfinite_losses_stop_with_a_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=6", "train.max_nonfinite_steps=2"))
    _poison(trainer, {2, 4})
    with pytest.raises(FloatingPointError, match="2 steps had a non-finite loss"):
        trainer.fit()
    newest = store.latest(tmp_path)
    assert newest.name == "step_0000004" and store.read_object(newest, "trainer")["nonfinite_steps"] == 2


# ----------------------------------------------------------------------------------------------- SIGKILL
def _command(out: Path, ranks: int, extra) -> list:
    args = ["--config", "configs/demo/digits.yaml", *TINY, f"train.output_dir={out}", "train.max_steps=10",
            "checkpoint.every=2", "checkpoint.resume=true", "train.log_every=1", *extra]
    if ranks == 1:
        return [sys.executable, "tools/train.py", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "tools/train.py", *args]


def _start(cmd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _logged_step(out: Path) -> int:
    try:
        rows = (out / "metrics.jsonl").read_text().splitlines()
        return json.loads(rows[-1])["step"] if rows else 0
    except (OSError, ValueError, IndexError):
        return 0  # a line being written


def _run_to_end(cmd, timeout=300):
    proc = _start(cmd)
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-3000:]


def _kill_tree(proc) -> None:
    """SIGKILL the launcher and every process under it (torchrun starts its workers in sessions of their own)."""
    import psutil

    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()
    psutil.wait_procs([p for p in map(_process, tree[1:]) if p is not None], timeout=30)


def _process(pid):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _kill_when(proc, out: Path, step: int, during_save: bool, timeout=300) -> str:
    """SIGKILL the whole process group once ``step`` is logged (then, if ``during_save``, as soon as an
    asynchronous save's temporary directory appears). Returns where it was killed."""
    deadline = time.monotonic() + timeout
    while _logged_step(out) < step:
        assert proc.poll() is None, f"run ended before step {step}: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    if during_save:
        while not list((out / "checkpoints").glob(".tmp_step_*")):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.001)
    _kill_tree(proc)
    return f"step {_logged_step(out)}" + (" during a save" if during_save else "")


ONLINE = "online"  # latent shards of real photos, REPA targets computed online (data.repa_features=online)


@pytest.mark.parametrize("ranks,extra", [
    (1, []),
    (2, ["parallel.engine=megatron", "parallel.distributed_optimizer=true"]),
    (1, ONLINE),
], ids=["one_process", "dp2", "online_repa"])
def test_sigkill_at_random_steps_then_auto_resume_is_bit_identical(tmp_path, ranks, extra, request):
    online = extra == ONLINE
    if online:  # 8 samples, batch 4: epochs of 2 steps, both flips; each batch's targets from its JPEGs
        request.getfixturevalue("streaming_tmp")  # a private TMPDIR; what the killed runs leak is reclaimed after
        from tests.data.online_data import extract_online, photo_tree
        from tests.train.test_online_repa import ONLINE_RUN

        data = extract_online(photo_tree(tmp_path / "photos"), tmp_path / "shards")
        extra = [*ONLINE_RUN, f"data.path={data}", "data.repa_features=online", "data.hflip=true"]
    _run_to_end(_command(tmp_path / "straight", ranks, extra))
    rng = random.Random(ranks)
    targets = sorted(rng.sample(range(1, 9), 3 if ranks == 1 and not online else 2))
    out, kills = tmp_path / "killed", []
    for i, step in enumerate(targets):
        proc = _start(_command(out, ranks, extra))
        kills.append(_kill_when(proc, out, step, during_save=i % 2 == 1))
    _run_to_end(_command(out, ranks, extra))
    log = (out / "log.txt").read_text()
    assert log.count("start: job") == len(targets) + 1, log
    assert "resumed from" in log
    assert_same_checkpoint(store.latest(out), store.latest(tmp_path / "straight"))
    assert losses(out) == losses(tmp_path / "straight"), kills
    assert not list((out / "checkpoints").glob(".tmp_*"))
