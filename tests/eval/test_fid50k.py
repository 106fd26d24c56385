"""FID-50K launcher (tools/fid50k.py, sfd_scale/eval/fid50k.py): sampling on 2 torchrun ranks (CPU), scoring on
rank 0 with an Inception stand-in that has logits, metrics.json, resume, and the checks before sampling."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sfd_scale.eval import fid
from sfd_scale.eval.fid50k import METRICS, score_samples

from .inception_standin import build_inception_standin
from .test_fid_sampling import TINY

REPO = Path(__file__).resolve().parents[2]
N = 20  # 2 per digit class; 5 sampling batches of 4 over 2 ranks
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
SCORES = ("fid", "sfid", "inception_score", "precision", "recall")
# Scores computed in another process may differ in the last bits: the Inception convolutions sum in an order that
# depends on torch's thread count, which the test process (other tests set it) and a fresh one need not share.
SAME_PROCESS_FREE = dict(rel=1e-6, abs=1e-9)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(checkpoint of a 2-step demo run, ADM-style reference batch of 40 digits, Inception stand-in with logits)."""
    root = tmp_path_factory.mktemp("fid50k")
    train = subprocess.run([sys.executable, "tools/train.py", "--config", "configs/demo/digits.yaml", *TINY,
                            "train.max_steps=2", f"train.output_dir={root / 'run'}"],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    from sklearn.datasets import load_digits
    digits = (load_digits().images[:40] * 16).clip(0, 255).astype(np.uint8)
    np.savez(root / "reference.npz", np.ascontiguousarray(np.repeat(digits[..., None], 3, axis=-1)))
    return (root / "run" / "checkpoints" / "step_0000002", root / "reference.npz",
            build_inception_standin(root / "inception.pt"))


def cli_args(inputs, out, *extra):
    ckpt, ref, inception = inputs
    return [str(ckpt), "--reference", str(ref), "--inception", str(inception), "--out", str(out),
            "--num-images", str(N), "--batch", "4", "--eval-batch", "8", "--fid-method", "fast",
            "--poll-seconds", "0.2", *extra]


@pytest.fixture(scope="module")
def two_ranks(inputs, tmp_path_factory):
    """The launcher under torchrun with 2 CPU ranks, as the README runs it (python -m sfd_scale.torchrun):
    (output directory, metrics.json, stdout)."""
    out = tmp_path_factory.mktemp("two_ranks") / "fid"
    cmd = [sys.executable, "-m", "sfd_scale.torchrun", "--standalone", "--nproc_per_node=2",
           "tools/fid50k.py", *cli_args(inputs, out)]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / METRICS).read_text()), done.stdout


def test_two_ranks_sample_and_rank0_scores(inputs, two_ranks):
    out, metrics, stdout = two_ranks
    ckpt, ref, inception = inputs
    assert all(isinstance(metrics[k], float) and math.isfinite(metrics[k]) for k in SCORES), metrics
    assert metrics["fid"] > 0 and metrics["sfid"] > 0 and metrics["inception_score"] >= 1.0
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert metrics["num_images"] == N and metrics["num_reference"] == 40 and metrics["unavailable"] == {}
    assert metrics["reference"] == str(ref.resolve()) and metrics["inception"] == str(inception.resolve())
    assert metrics["checkpoint"] == str(ckpt.resolve()) and metrics["world_size"] == 2
    assert metrics["sampling"]["num_images"] == N and metrics["sampling"]["sample.method"] == "heun2"
    npz = out / f"samples_{N}x16x16x3.npz"
    assert metrics["samples"] == str(npz.resolve())
    with np.load(npz) as z:  # class-balanced over both ranks' shares
        assert z["arr_0"].shape == (N, 16, 16, 3) and np.bincount(z["arr_1"]).tolist() == [2] * 10
    assert sorted(line.split(":")[0] for line in stdout.splitlines() if line.startswith("rank ")) == \
        ["rank 0/2", "rank 1/2"]
    assert f"FID-{N}: fid={metrics['fid']:.4f}" in stdout
    # The numbers are the library's ADM metrics of the merged samples (tools/eval_fid.py's).
    direct = fid.evaluate(npz, ref, inception=str(inception), batch_size=8, fid_method="fast")
    assert [direct[k] for k in ("fid", "sfid", "is", "precision", "recall")] == \
        pytest.approx([metrics[k] for k in SCORES], **SAME_PROCESS_FREE)


def test_resume_after_losing_half_the_parts_gives_the_same_metrics(inputs, two_ranks, tmp_path, capsys,
                                                                   monkeypatch):
    """What a job killed half-way leaves (no merged npz, no metrics, half the parts), continued by one process."""
    out, metrics, _ = two_ranks
    resumed = tmp_path / "fid"
    shutil.copytree(out, resumed)
    for p in [resumed / METRICS, resumed / "grid.png", *resumed.glob("samples_*.npz"),
              *sorted((resumed / "parts").iterdir())[::2]]:
        p.unlink()
    assert len(list((resumed / "parts").iterdir())) == 2
    from tools.fid50k import main

    assert main(cli_args(inputs, resumed)) == 0
    captured = capsys.readouterr()
    assert "rank 0/1: sampled 12 images (8 of this rank's share were already there)" in captured.out
    assert "Inception features" not in captured.err  # stderr is no terminal here: no progress bars
    again = json.loads((resumed / METRICS).read_text())
    assert [again[k] for k in SCORES] == pytest.approx([metrics[k] for k in SCORES], **SAME_PROCESS_FREE)
    assert again["num_images"] == N
    assert again["world_size"] == 1

    # Run once more: nothing to sample, and the finished metrics are read back, not recomputed.
    monkeypatch.setattr("sfd_scale.eval.fid50k.evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    assert main(cli_args(inputs, resumed)) == 0
    assert json.loads((resumed / METRICS).read_text()) == again


def test_without_logits_is_null_with_the_reason_and_bars_on_request(inputs, two_ranks, tmp_path, capsys):
    out, metrics, _ = two_ranks
    npz = next(out.glob("samples_*.npz"))
    scored = tmp_path / "fid"
    scored.mkdir()
    shutil.copy(out / "fid_samples.json", scored)
    no_logits = fid.InceptionFeatures(build_inception_standin(tmp_path / "no_logits.pt", with_logits=False))
    result = score_samples(scored, npz, str(inputs[1]), no_logits, batch_size=8, fid_method="fast", progress=True)
    assert result["inception_score"] is None and "inception-2015-12-05.pt" in result["unavailable"]["inception_score"]
    assert [result["fid"], result["sfid"]] == pytest.approx([metrics["fid"], metrics["sfid"]],
                                                            **SAME_PROCESS_FREE)  # same layers, same features
    err = capsys.readouterr().err
    assert f"Inception features: {inputs[1]}" in err and f"Inception features: {npz}" in err and "40/40" in err


def test_bad_reference_or_network_fails_before_sampling(inputs, tmp_path, capsys):
    from tools.fid50k import main

    bad = cli_args(inputs, tmp_path / "a")
    bad[bad.index("--reference") + 1] = str(tmp_path / "missing.npz")
    assert main(bad) == 2
    (tmp_path / "garbage.pt").write_text("not a network")
    bad = cli_args(inputs, tmp_path / "b")
    bad[bad.index("--inception") + 1] = str(tmp_path / "garbage.pt")
    assert main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()  # one line each (sfd_scale.cli.entry_point)
    assert len(err) == 2 and err[0].startswith("error: ") and "missing.npz: no such file" in err[0], err
    assert "cannot load Inception network" in err[1], err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
