"""The sbatch scripts on a real SLURM cluster (one node on localhost, see conftest.py), run as users run them:
an extraction job array against one rank, and training jobs that are signalled or preempted, checkpoint,
requeue themselves, resume and end with exactly the weights of an uninterrupted run."""
from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

# tests/train/test_trainer.py's tiny digits model; ~70 steps/s on one core
TINY = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "data.demo_samples=128",
        "train.global_batch_size=16", "logging.wandb_mode=disabled", "logging.progress=false",
        "sample.method=euler", "sample.num_steps=4", "sample.grid_images=4", "optim.warmup_steps=2"]
STEPS = 400  # long enough (~5 s of steps) for a signal sent after step 10 to land mid-run
# (the demo config turns checkpoint.resume off: a requeued job must resume)
TRAIN = ["configs/demo/digits.yaml", *TINY, f"train.max_steps={STEPS}", "train.log_every=10", "checkpoint.every=100",
         "checkpoint.resume=true"]
ONE_CORE = ["--cpus-per-task=1", "--time=10"]


# --------------------------------------------------------------------------------------------- extraction
def image_tree(root: Path) -> Path:
    """3 classes x 4 random images of several sizes, PNG and JPEG."""
    rng = np.random.default_rng(0)
    for c, cls in enumerate(["a_cat", "b_dog", "c_fox"]):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            a = rng.integers(0, 256, (64 + 17 * i, 80 - 9 * c, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / cls / f"img{i}.{'png' if i % 2 else 'jpg'}", quality=95)
    return root


def dataset_files(root: Path) -> dict:
    """Digest of every file of a finished dataset; sfd_dataset.json without its run-specific fields."""
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(f.relative_to(root))
        if f.name == "sfd_dataset.json":
            meta = json.loads(f.read_text())
            out[rel] = {k: v for k, v in meta.items() if not re.search(r"time|date|host|seconds|created", k)}
        else:
            out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_extract_array_equals_one_rank(slurm, tmp_path):
    images = image_tree(tmp_path / "images")
    common = ["slurm/extract_array.sbatch", "configs/extract/tiny_cpu.yaml", f"input={images}", "chunk_size=3",
              "batch_size=2", "progress=false"]  # 12 images -> 4 parts
    ref = slurm.sbatch("--array=0-0", *ONE_CORE, f"--output={tmp_path}/ref-%A_%a.out", *common,
                       f"output={tmp_path}/ref")
    arr = slurm.sbatch("--array=0-1", *ONE_CORE, f"--output={tmp_path}/arr-%A_%a.out", *common,
                       f"output={tmp_path}/arr")
    for job, name in ((ref, "ref"), (arr, "arr")):
        slurm.wait(job, ("COMPLETED",), timeout=120, log=tmp_path / f"{name}-{job}_0.out")
    logs = [slurm.read(tmp_path / f"arr-{arr}_{i}.out") for i in range(2)]
    for i, log in enumerate(logs):
        assert f"Rank {i}/2 encoded 6 images" in log and "into 2 new parts" in log, log
    assert "Rank 0/1 encoded 12 images" in slurm.read(tmp_path / f"ref-{ref}_0.out")

    want, got = dataset_files(tmp_path / "ref"), dataset_files(tmp_path / "arr")
    assert [k for k in want if k.startswith("part_")] and "stats.safetensors" in want and "index.json" in want
    assert got == want

    # resubmitting the same array redoes nothing and leaves the dataset as it is
    again = slurm.sbatch("--array=0-1", *ONE_CORE, f"--output={tmp_path}/again-%A_%a.out", *common,
                         f"output={tmp_path}/arr")
    slurm.wait(again, ("COMPLETED",), timeout=120, log=tmp_path / f"again-{again}_0.out")
    for i in range(2):
        assert f"Rank {i}/2 encoded 0 images" in slurm.read(tmp_path / f"again-{again}_{i}.out")
    assert dataset_files(tmp_path / "arr") == want


# --------------------------------------------------------------------------------------------- training
def weights(out: Path) -> dict:
    from sfd_scale import checkpoint_store as store
    last = store.latest(out)
    assert last is not None, f"no verified checkpoint in {out}"
    with warnings.catch_warnings():  # torch.distributed.checkpoint, read without a process group: expected
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        return {"checkpoint": last.name, **{which: store.read_weights(last, which) for which in ("model", "ema")}}


def assert_same_weights(got: dict, want: dict) -> None:
    import torch
    assert got["checkpoint"] == want["checkpoint"] == f"step_{STEPS:07d}"
    for which in ("model", "ema"):
        assert got[which].keys() == want[which].keys() and got[which]
        bad = [k for k in want[which] if not torch.equal(got[which][k], want[which][k])]
        assert not bad, f"{which}: {len(bad)} tensors differ from the uninterrupted run, e.g. {bad[:3]}"


class Reference:
    """The uninterrupted run of TRAIN as a job of its own; submitted once, waited for when needed. It is submitted
    as an installed package is used, from a directory outside the checkout: the script by the path ``sfd
    slurm-script --path train`` prints, the config by its shipped name (the other jobs: from the checkout)."""

    def __init__(self, slurm, root: Path):
        from sfd_scale.resources import SLURM

        self.slurm, self.out, self._weights = slurm, root / "run", None
        self.job = slurm.sbatch(*ONE_CORE, f"--output={root}/%x-%j.out", str(SLURM / "train.sbatch"), "demo/digits",
                                *TRAIN[1:], f"train.output_dir={self.out}", cwd=str(root))
        self.log = root / f"sfd-train-{self.job}.out"

    def weights(self) -> dict:
        if self._weights is None:
            rec = self.slurm.wait(self.job, ("COMPLETED",), timeout=180, log=self.log)
            assert rec["Restarts"] == "0"
            self._weights = weights(self.out)
        return self._weights


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory):
    return Reference(slurm, tmp_path_factory.mktemp("reference"))


def train_job(slurm, root: Path, *sbatch_args: str) -> tuple:
    job = slurm.sbatch(*sbatch_args, f"--output={root}/%x-%j.out", "slurm/train.sbatch", *TRAIN,
                       f"train.output_dir={root / 'run'}")
    return job, root / f"sfd-train-{job}.out"


def check_requeued_run(slurm, job: str, log: Path, run: Path, how: str, steps: int = STEPS,
                       timeout: float = 180) -> str:
    """The job ran twice (restart 0, then 1), the second run resumed and finished; returns the job log."""
    slurm.wait_for_text(log, r"job \d+ restart 1 on", timeout=120, job_id=job)
    rec = slurm.wait(job, ("COMPLETED",), timeout=timeout, log=log)
    assert rec["Restarts"] == "1" and rec["ExitCode"] == "0:0", rec
    text = slurm.read(log)
    first, second = text.split(f"job {job} restart 1 on")
    assert f"job {job} restart 0 on" in first and how in first, text
    assert "srun exited with 75" in first and f"requeueing job {job}" in first, text
    assert "srun exited with 0" in second, text
    run_log = slurm.read(run / "log.txt")
    assert f"job {job} restart 0" in run_log and f"job {job} restart 1" in run_log, run_log
    assert "signal SIGUSR1" in run_log, run_log
    resumed = re.findall(r"resumed from \S*step_(\d+)", run_log)
    assert len(resumed) == 1 and 10 <= int(resumed[0]) < steps, run_log  # the signal's checkpoint, mid-run
    return text


def test_signal_checkpoint_requeue_resume(slurm, reference, tmp_path):
    """THE acceptance test: scancel --signal=USR1 --batch mid-run -> checkpoint, exit 75, requeue,
    restart 1 resumes and finishes with the uninterrupted run's weights, bit for bit."""
    job, log = train_job(slurm, tmp_path, *ONE_CORE)
    slurm.wait_for_text(log, r"step 10:", timeout=120, job_id=job)
    slurm.signal(job, "USR1", batch=True)
    check_requeued_run(slurm, job, log, tmp_path / "run", how="batch shell got SIGUSR1")
    assert_same_weights(weights(tmp_path / "run"), reference.weights())


def test_preempted_by_high_priority_job(slurm, reference, tmp_path):
    """partition_prio preemption (PreemptMode=REQUEUE): a job in partition 'high' needs the node that the
    training job (partition 'low', both cores) holds; SLURM signals it (preempt_send_user_signal ->
    USR1 to the batch shell), requeues it, and it resumes after the sampling job and finishes exactly."""
    job, log = train_job(slurm, tmp_path, "--partition=low", "--cpus-per-task=2", "--time=10")
    slurm.wait_for_text(log, r"step 10:", timeout=120, job_id=job)
    reference.weights()  # its checkpoint is what the preempting job samples
    from sfd_scale import checkpoint_store as store
    png = tmp_path / "grid.png"
    sample = slurm.sbatch("--partition=high", *ONE_CORE, f"--output={tmp_path}/%x-%j.out", "slurm/sample.sbatch",
                          str(store.latest(reference.out)), "--out", str(png))
    slurm.wait(sample, ("COMPLETED",), timeout=120, log=tmp_path / f"sfd-sample-{sample}.out")
    assert png.is_file() and png.stat().st_size > 0
    check_requeued_run(slurm, job, log, tmp_path / "run", how="batch shell got SIGUSR1")
    assert_same_weights(weights(tmp_path / "run"), reference.weights())


def test_srun_ranks_meet_through_slurm_variables(slurm, tmp_path):
    """Two srun tasks get RANK / WORLD_SIZE / MASTER_* from slurm_rendezvous (via the trainer's
    layout._init_process_group) and form one gloo group."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import os, torch, torch.distributed as dist\n"
        "from sfd_scale.parallel import layout\n"
        "layout._init_process_group()\n"
        "t = torch.tensor([float(dist.get_rank() + 1)])\n"
        "dist.all_reduce(t)\n"
        "e = os.environ\n"
        "print('rank', e['RANK'], 'of', e['WORLD_SIZE'], 'local', e['LOCAL_RANK'], e['LOCAL_WORLD_SIZE'],\n"
        "      e['MASTER_ADDR'], e['MASTER_PORT'], 'sum', int(t.item()), dist.get_world_size(), flush=True)\n"
        "dist.destroy_process_group()\n")
    log = tmp_path / "ranks.out"
    job = slurm.sbatch("--ntasks=2", "--cpus-per-task=1", "--time=5", f"--output={log}",
                       "--wrap", f"srun python {script}")
    slurm.wait(job, ("COMPLETED",), timeout=120, log=log)
    port = 15000 + int(job) % 15000
    lines = sorted(l for l in slurm.read(log).splitlines() if l.startswith("rank "))
    assert lines == [f"rank {r} of 2 local {r} 2 {slurm.host} {port} sum 3 2" for r in range(2)], slurm.read(log)


def test_scancel_stops_for_good(slurm, tmp_path):
    """Plain scancel sends TERM to the batch shell and the tasks: the trainer still checkpoints, but the job
    ends CANCELLED and is not requeued (the script requeues only after USR1 or the time budget)."""
    job, log = train_job(slurm, tmp_path, *ONE_CORE)
    slurm.wait_for_text(log, r"step 10:", timeout=120, job_id=job)
    slurm.cancel(job)
    slurm.wait_for_text(log, r"srun exited with", timeout=60)
    slurm.wait(job, ("CANCELLED",), timeout=30, log=log)
    time.sleep(2)  # a wrong `scontrol requeue` would have made it PENDING by now
    rec = slurm.job(job)
    assert rec["JobState"] == "CANCELLED" and rec["Restarts"] == "0", rec
    text = slurm.read(log)
    assert "batch shell got SIGTERM" in text and "requeueing" not in text, text
    run_log = slurm.read(tmp_path / "run" / "log.txt")
    assert re.search(r"stopping at step \d+: signal SIGTERM", run_log), run_log
