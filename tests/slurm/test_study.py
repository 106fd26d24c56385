"""A two-run convergence study on the localhost SLURM cluster (conftest.py): ``tools/study.py --launcher slurm``
submits each run's train -> eval -> train -> eval chain (afterok) and a collect job after every evaluation;
the table ends with both runs' points, each evaluation having run after the training segment it scores."""
from __future__ import annotations

import csv
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from tests.test_study import write_study

REPO = Path(__file__).resolve().parents[2]
ONE_CORE = "slurm: {common: [--cpus-per-task=1, --time=10], train: [], eval: [], collect: []}\n"


def _time(rec: dict, key: str) -> datetime:
    return datetime.fromisoformat(rec[key])


def test_study_submits_chains_evaluation_and_collects(slurm, tmp_path):
    study, out = write_study(tmp_path, ONE_CORE), tmp_path / "out"
    r = subprocess.run([sys.executable, "tools/study.py", str(study), "--out", str(out), "--launcher", "slurm"],
                       cwd=REPO, env=slurm.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    submitted = re.findall(r"submitted (\d+): tiny-(\S+)", r.stdout)
    names = [name for _, name in submitted]
    assert names == ["sfd-train-2", "sfd-eval-2", "sfd-train-4", "sfd-eval-4", "texture_only-train-2",
                     "texture_only-eval-2", "texture_only-train-4", "texture_only-eval-4", "collect"], r.stdout
    jobs = dict((name, job) for job, name in submitted)
    assert "Job ids: " + " ".join(job for job, _ in submitted) in r.stdout

    collect = slurm.wait(jobs["collect"], ("COMPLETED",), timeout=400,
                         log=out / "logs" / f"tiny-collect-{jobs['collect']}.out")
    recs = {name: slurm.job(job) for name, job in jobs.items()}
    assert all(rec["JobState"] == "COMPLETED" for rec in recs.values()), {k: v["JobState"] for k, v in recs.items()}
    for run in ("sfd", "texture_only"):  # each job started once the one before it in its chain had ended
        chain = [recs[f"{run}-{kind}-{step}"] for step in (2, 4) for kind in ("train", "eval")]
        for before, after in zip(chain, chain[1:]):
            assert _time(before, "EndTime") <= _time(after, "StartTime")
        assert _time(chain[-1], "EndTime") <= _time(collect, "StartTime")
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(row["run"], row["step"]) for row in rows] == [("sfd", "2"), ("sfd", "4"), ("texture_only", "2"),
                                                          ("texture_only", "4")]
    assert (out / "fid_vs_images.png").stat().st_size > 0 and "best of sfd" in (out / "results.md").read_text()
    log = slurm.read(out / "logs" / f"tiny-sfd-eval-4-{jobs['sfd-eval-4']}.out")
    assert "sfd step 4: FID" in log, log

    # submitting again: every point is done, so only a collect job would go in
    again = subprocess.run([sys.executable, "tools/study.py", str(study), "--out", str(out), "--launcher", "slurm",
                            "--dry-run"], cwd=REPO, env=slurm.env, capture_output=True, text=True, timeout=120)
    commands = [line for line in again.stdout.splitlines() if line.startswith("sbatch ")]
    assert again.returncode == 0 and len(commands) == 1 and commands[0].endswith("--collect-only"), \
        again.stdout + again.stderr
