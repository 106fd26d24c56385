"""Convergence studies (sfd_scale/study.py, tools/study.py): study files load, a tiny two-run study runs end to
end (table, plot, speed-ups), and a study SIGKILLed mid-way and run again ends with the uninterrupted study's
numbers without redoing finished points."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sfd_scale.study import StudyError, check_runs, images_to_reach, load_study, speedups

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted(str(p) for p in (REPO / "configs" / "studies").glob("*.yaml"))
METRICS = ("fid", "sfid", "precision", "recall", "num_images", "images_seen")

# tests/train/test_trainer.py's tiny digits model; 40 digits keep the Inception reference cheap
TINY_STUDY = """\
name: tiny
configs: [{repo}/configs/demo/digits.yaml]
overrides: [model.depth=2, model.hidden_size=32, model.num_heads=2, data.demo_samples=40, train.global_batch_size=16,
            train.log_every=1, logging.wandb_mode=disabled, logging.progress=false, sample.grid_images=4,
            optim.warmup_steps=2]
reference: sfd
runs:
  sfd: []
  texture_only: {{sfd.semantic_chans: 0}}
checkpoint_every: 1
eval:
  steps: [2, 4]
  images: 20
  reference: demo
  batch: 10
  sample: [sample.method=euler, sample.num_steps=4]
speedup_fids: [1000, 1]
{extra}"""


def write_study(root: Path, extra: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tiny.yaml"
    path.write_text(TINY_STUDY.format(repo=REPO, extra=extra))
    return path


def env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
                PYTHONUNBUFFERED="1", WANDB_MODE="disabled")


def study_cmd(study: Path, out: Path, *extra: str) -> list:
    return [sys.executable, str(REPO / "tools" / "study.py"), str(study), "--out", str(out), *extra]


def results(out: Path) -> dict:
    return {(p.parent.name, p.name): {k: json.loads(p.read_text())[k] for k in METRICS}
            for p in sorted((out / "results").glob("*/step_*.json"))}


# --------------------------------------------------------------------------------------------- study files
@pytest.mark.parametrize("path", STUDIES, ids=[Path(p).stem for p in STUDIES])
def test_shipped_studies_load_and_every_run_config_validates(path, tmp_path):
    study = load_study(path)
    assert study.reference in study.runs and study.eval.steps and study.eval.images > 3
    check_runs(study, tmp_path)


def test_digits_study_compares_at_equal_compute():
    from dataclasses import asdict

    from sfd_scale.config import config_from_dict
    from sfd_scale.study import run_config

    study = load_study(REPO / "configs" / "studies" / "digits_cpu.yaml")
    assert study.eval.reference == "demo" and set(study.runs) == {"sfd", "dt0", "texture_only"}
    cfgs = {run: run_config(study, run, study.eval.steps[-1], "/tmp/x") for run in study.runs}
    assert {(c.train.global_batch_size, c.train.max_steps) for c in cfgs.values()} == {(48, study.eval.steps[-1])}
    assert (cfgs["sfd"].sfd.delta_t, cfgs["dt0"].sfd.delta_t, cfgs["texture_only"].sfd.semantic_chans) == (0.3, 0.0, 0)
    for cfg in cfgs.values():  # a fixed-step sampler: FID samples do not depend on the batch
        assert config_from_dict(asdict(cfg), study.eval.sample).sample.method in ("euler", "heun2")


@pytest.mark.parametrize("extra,match", [
    ("colour: red\n", "colour"),
    ("slurm: {trian: []}\n", "slurm.trian"),
])
def test_bad_study_files_name_the_problem(tmp_path, extra, match):
    with pytest.raises(StudyError, match=match):
        load_study(write_study(tmp_path, extra))


def test_bad_schedule_and_reference(tmp_path):
    path = write_study(tmp_path)
    path.write_text(path.read_text().replace("steps: [2, 4]", "steps: [4, 2]"))
    with pytest.raises(StudyError, match="eval.steps"):
        load_study(path)
    path = write_study(tmp_path)
    path.write_text(path.read_text().replace("reference: sfd", "reference: nope"))
    with pytest.raises(StudyError, match="nope"):
        load_study(path)


def test_run_overrides_keep_the_scheduled_checkpoints(tmp_path):
    study = load_study(write_study(tmp_path), ["train.seed=3"])
    ov = study.run_overrides("texture_only", 4, tmp_path)
    assert ov.index("train.seed=3") < ov.index("sfd.semantic_chans=0")  # command line, then the run's own
    assert {"train.max_steps=4", "checkpoint.resume=true", "checkpoint.keep_every=2", "checkpoint.every=1",
            f"train.output_dir={tmp_path / 'runs' / 'texture_only'}"} <= set(ov)


def test_set_changes_the_study_file_and_travels_to_the_slurm_jobs(tmp_path, capsys):
    """``tools/study.py --set KEY=VALUE`` edits the study's own keys (checked like the file's); the evaluation
    and collect jobs get the same --set, so they see the study that was submitted."""
    path = write_study(tmp_path)
    study = load_study(path, study_overrides=["eval.steps=[3]", "eval.images=8"])
    assert study.eval.steps == [3] and study.eval.images == 8 and study.study_overrides == ["eval.steps=[3]",
                                                                                              "eval.images=8"]
    with pytest.raises(StudyError, match="eval.images must be > 3"):
        load_study(path, study_overrides=["eval.images=2"])
    from tools.study import main as study_main
    assert study_main([str(path), "--out", str(tmp_path / "s"), "--launcher", "slurm", "--dry-run",
                       "--set", "eval.steps=[3]"]) == 0
    jobs = [line for line in capsys.readouterr().out.splitlines() if "study_eval.sbatch" in line]
    assert len(jobs) == 3 and all("--set=eval.steps=[3]" in line for line in jobs)  # 2 evaluations + collect


# --------------------------------------------------------------------------------------------- speed-ups
def test_images_to_reach_interpolates_linearly():
    pts = [(100, 50.0), (200, 30.0), (400, 10.0)]
    assert images_to_reach(pts, 40.0) == 150.0
    assert images_to_reach(pts, 10.0) == 400.0
    assert images_to_reach(pts, 60.0) == 100.0  # already there at the first point
    assert images_to_reach(pts, 5.0) is None
    table = speedups({"ref": [(100, 20.0), (200, 10.0)], "slow": pts}, "ref", [10.0, 5.0])
    assert table[0]["reference_images"] == 200.0 and table[0]["runs"]["slow"]["ratio"] == 2.0
    assert table[0]["runs"]["ref"]["ratio"] == 1.0
    assert table[1]["runs"]["slow"]["ratio"] is None and table[1]["reference_images"] is None


# --------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The tiny study run once, uninterrupted, as users run it."""
    root = tmp_path_factory.mktemp("straight")
    study, out = write_study(root), root / "out"
    r = subprocess.run(study_cmd(study, out), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return study, out, r.stdout


def test_study_writes_table_plot_and_speedups(straight):
    study, out, stdout = straight
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["run"], int(r["step"]), int(r["images_seen"])) for r in rows] == \
        [("sfd", 2, 32), ("sfd", 4, 64), ("texture_only", 2, 32), ("texture_only", 4, 64)]
    assert all(0 < float(r["fid"]) < 1e4 and r["sfid"] and r["precision"] for r in rows)
    png = out / "fid_vs_images.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    md = (out / "results.md").read_text()
    assert "| texture_only | 4 | 64 |" in md and "best of sfd" in md and "Speed-up" in md
    speed = list(csv.DictReader((out / "speedup.csv").open()))
    best = min(float(r["fid"]) for r in rows if r["run"] == "sfd")
    first = [r for r in speed if float(r["fid"]) == best]
    assert {r["run"] for r in first} == {"sfd", "texture_only"} and float(first[0]["ratio"]) == 1.0
    assert all(not r["images"] for r in speed if float(r["fid"]) == 1.0)  # FID 1: not reached by anyone
    assert "Study tiny: 4 of 4 points evaluated" in stdout
    point = json.loads((out / "results" / "sfd" / "step_0000004.json").read_text())
    assert point["num_images"] == 20 and point["sample"]["method"] == "euler"
    assert (out / "runs" / "sfd" / "checkpoints" / "step_0000002").is_dir()  # scheduled steps are kept


def _kill_tree(proc) -> None:
    """SIGKILL the study process and everything under it (tests/train/test_fault_tolerance.py's)."""
    from tests.train.test_fault_tolerance import _kill_tree as kill
    kill(proc)


def _run_until(cmd: list, trigger: Path, timeout: float = 240) -> None:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while not trigger.exists():
        assert proc.poll() is None, f"ended before {trigger} appeared:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"no {trigger} after {timeout} s"
        time.sleep(0.02)
    _kill_tree(proc)


def test_killed_study_reruns_to_the_same_numbers(straight, tmp_path):
    """SIGKILL the study (process tree) in the middle of its second run's training, then run it again: the same
    numbers as the uninterrupted study, and the first run's finished points are not redone."""
    study, out = write_study(tmp_path), tmp_path / "out"
    (out / "fid").mkdir(parents=True)  # the reference statistics are computed once per study: reuse them
    shutil.copy(straight[1] / "fid" / "reference.npz", out / "fid" / "reference.npz")
    _run_until(study_cmd(study, out), out / "runs" / "texture_only" / "checkpoints" / "step_0000001")
    done = {p: p.stat().st_mtime_ns for p in (out / "results" / "sfd").glob("step_*.json")}
    assert len(done) == 2 and not (out / "results.csv").exists()
    r = subprocess.run(study_cmd(study, out), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert results(out) == results(straight[1]) and len(results(out)) == 4
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished points are not redone
    assert "sfd: training" not in r.stdout and "sfd: FID of step" not in r.stdout, r.stdout
    assert "texture_only step 2: FID" in r.stdout and "texture_only step 4: FID" in r.stdout, r.stdout
    assert (out / "results.csv").read_text() == (straight[1] / "results.csv").read_text()
