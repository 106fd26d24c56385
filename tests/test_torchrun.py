"""``python -m sfd_scale.torchrun`` keeps the requeue status 75 that plain torchrun turns into 1 (issue #16)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from sfd_scale import checkpoint_store as store
from sfd_scale.torchrun import kept_status
from sfd_scale.train.run_control import REQUEUE_EXIT
from tests.train.test_trainer import TINY

ROOT = Path(__file__).resolve().parents[1]


def _failed(*exitcodes) -> ChildFailedError:
    failures = {}
    for rank, code in enumerate(exitcodes):  # the first listed exits first
        failures[rank] = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="<N/A>")
        failures[rank].timestamp = 100 + rank
    return ChildFailedError("tools/train.py", failures)


@pytest.mark.parametrize("exitcodes,kept", [
    ((75, 75), 75),
    ((75, -signal.SIGTERM), 75),  # torchrun stops the other workers once the first one exits
    ((2, -signal.SIGTERM), 2),
    ((1, 75), None),              # a crash first: torchrun's report and status
    ((75, 1), None),
    ((-signal.SIGKILL, 75), None),
    ((75, 2), None),
])
def test_which_failures_keep_their_status(exitcodes, kept):
    assert kept_status(_failed(*exitcodes)) == kept


def _run(launcher, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", launcher, "--standalone", "--nproc_per_node=2", "tools/train.py",
           "--config", "configs/demo/digits.yaml", *TINY, f"train.output_dir={out}", "train.max_steps=10",
           "checkpoint.every=2", "checkpoint.resume=true", "parallel.engine=megatron", "train.time_budget_s=1e-6"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_a_2_rank_requeue_exits_75_through_our_launcher_and_1_through_torchrun(tmp_path):
    """Both ranks reach train.time_budget_s, write the step-2 checkpoint together and exit 75."""
    ours = _run("sfd_scale.torchrun", tmp_path / "ours")
    assert ours.returncode == REQUEUE_EXIT, ours.stderr[-3000:]
    assert f"sfd_scale.torchrun: workers exited {REQUEUE_EXIT}: stopped for a requeue" in ours.stderr
    assert store.latest(tmp_path / "ours").name == "step_0000002"
    assert "train.time_budget_s=1e-06 reached" in (tmp_path / "ours" / "log.txt").read_text()
    plain = _run("torch.distributed.run", tmp_path / "plain")
    assert plain.returncode == 1 and "exitcode  : 75" in plain.stderr, plain.stderr[-3000:]
    assert store.latest(tmp_path / "plain").name == "step_0000002"
