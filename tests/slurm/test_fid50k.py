"""slurm/fid50k.sbatch on a real SLURM cluster (one node on localhost, see conftest.py): two srun tasks sample,
the time-limit warning (USR1 to the batch shell) stops them mid-way, the job requeues itself and continues,
and task 0 ends with the metrics of an uninterrupted one-process run."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.eval.inception_standin import build_inception_standin
from tests.eval.test_fid_sampling import TINY

REPO = Path(__file__).resolve().parents[2]
N = 200  # 50 batches of 4 with 40 solver steps each: seconds of sampling, time for a signal to land mid-way


def test_fid50k_job_requeues_on_usr1_and_scores_once(slurm, tmp_path):
    train = subprocess.run([sys.executable, "tools/train.py", "--config", "configs/demo/digits.yaml", *TINY,
                            "train.max_steps=2", f"train.output_dir={tmp_path / 'run'}"],
                           cwd=REPO, env=slurm.env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    from sklearn.datasets import load_digits
    digits = (load_digits().images[:40] * 16).clip(0, 255).astype(np.uint8)
    np.savez(tmp_path / "reference.npz", np.ascontiguousarray(np.repeat(digits[..., None], 3, axis=-1)))
    args = [str(tmp_path / "run" / "checkpoints" / "step_0000002"), "--reference", str(tmp_path / "reference.npz"),
            "--inception", str(build_inception_standin(tmp_path / "inception.pt")), "--num-images", str(N),
            "--batch", "4", "--eval-batch", "50", "--fid-method", "fast", "--poll-seconds", "0.5",
            "sample.num_steps=40"]

    out = tmp_path / "fid"
    job = slurm.sbatch("--ntasks-per-node=2", "--cpus-per-task=1", "--time=10", f"--output={tmp_path}/%x-%j.out",
                       "slurm/fid50k.sbatch", *args, "--out", str(out))
    log = tmp_path / f"sfd-fid50k-{job}.out"
    deadline = time.monotonic() + 180
    while len(list((out / "parts").glob("part_*.npz"))) < 4:  # both tasks are sampling
        assert time.monotonic() < deadline and slurm.job(job).get("JobState") in ("PENDING", "RUNNING"), \
            slurm.read(log)
        time.sleep(0.2)
    slurm.signal(job, "USR1")
    rec = slurm.wait(job, ("COMPLETED",), timeout=300, log=log)
    text = slurm.read(log)
    assert rec["Restarts"] == "1" and "batch shell got SIGUSR1" in text and "requeueing" in text, text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["num_images"] == N and metrics["unavailable"] == {}
    assert all(math.isfinite(metrics[k]) for k in ("fid", "sfid", "inception_score", "precision", "recall"))

    alone = subprocess.run([sys.executable, "tools/fid50k.py", *args, "--out", str(tmp_path / "alone")],
                           cwd=REPO, env=slurm.env, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-2000:]
    want = json.loads((tmp_path / "alone" / "metrics.json").read_text())
    assert [metrics[k] for k in ("fid", "sfid", "inception_score", "precision", "recall")] == \
        [want[k] for k in ("fid", "sfid", "inception_score", "precision", "recall")]
