"""FID sampling: class-balanced, independent of ranks / batch size / restarts, resumable, and its CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sfd_scale.config import load_config, model_args
from sfd_scale.eval.fid_sampling import LOCK, FidSamplingError, merge_samples, sample_for_fid
from sfd_scale.data.sources import sampling_decoder
from sfd_scale.models.lightningdit import LightningDiT

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "data.demo_samples=128",
        "train.global_batch_size=16", "train.log_every=2", "logging.wandb_mode=disabled", "logging.progress=false",
        "sample.method=heun2", "sample.num_steps=4", "sample.grid_images=4", "optim.warmup_steps=2"]
N = 30  # 3 per digit class


def tiny_config(*extra):
    return load_config([str(REPO / "configs/demo/digits.yaml")], TINY + list(extra))


@pytest.fixture(scope="module")
def model():
    """A random LightningDiT, perturbed so that labels and guidance matter (adaLN-zero starts at v = 0)."""
    torch.manual_seed(0)
    m = LightningDiT(model_args(tiny_config()))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def decode():
    return sampling_decoder(tiny_config())[0]  # the demo's fixed decoder (built once: it fits a PCA)


def run(model, out, decode, **kw):
    return sample_for_fid(model, kw.pop("cfg", None) or tiny_config(), out, kw.pop("n", N), decode,
                          progress=False, **kw)


@pytest.fixture(scope="module")
def reference(model, decode, tmp_path_factory):
    res = run(model, tmp_path_factory.mktemp("ref"), decode, batch_size=4)
    assert res.complete and res.sampled == N and res.skipped == 0
    with np.load(res.npz) as z:
        return z["arr_0"], z["arr_1"], res


def test_balanced_labels_and_independent_of_ranks_and_batch(model, decode, reference, tmp_path):
    images, labels, ref = reference
    assert ref.npz.name == f"samples_{N}x16x16x3.npz" and images.shape == (N, 16, 16, 3) and images.dtype == np.uint8
    assert labels.tolist() == [k // 3 for k in range(N)]  # 3 per class, by global index
    assert len({images[i].tobytes() for i in range(N)}) == N
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(ref.out_dir / "images" / "000017.png")), images[17])
    assert ref.grid.stat().st_size > 0
    info = json.loads((ref.out_dir / "fid_samples.json").read_text())
    assert info["settings"]["num_images"] == N and info["settings"]["sample.guidance"] == "cfg" and info["npz"]

    first = run(model, tmp_path / "two", decode, batch_size=4, rank=0, world_size=2)  # 2 "ranks" in turn
    assert not first.complete and first.sampled == 16
    os.environ.update(RANK="1", WORLD_SIZE="2")
    try:
        second = run(model, tmp_path / "two", decode, batch_size=4)
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]
    assert second.complete and second.sampled == 14
    other_batch = run(model, tmp_path / "b7", decode, batch_size=7)
    for res in (second, other_batch):
        with np.load(res.npz) as z:
            assert np.array_equal(z["arr_0"], images) and np.array_equal(z["arr_1"], labels)


class Killed(Exception):
    pass


def interrupt(a, b):
    raise Killed


def test_killed_run_resumes_to_the_same_images_once(model, decode, reference, tmp_path):
    images, _, _ = reference

    def kill_after_three(a, b):
        if a >= 8:
            raise Killed
    with pytest.raises(Killed):
        run(model, tmp_path, decode, batch_size=4, after_part=kill_after_three)
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == [
        "part_000000_000004.npz", "part_000004_000008.npz", "part_000008_000012.npz"]
    # What a SIGKILL mid-batch leaves: torn temp files and some PNGs of a batch without its part.
    (tmp_path / "parts" / ".tmp_part_000012_000016.npz.99999").write_bytes(b"PK\x03\x04torn")
    (tmp_path / "images" / ".tmp_000013.png.99999").write_bytes(b"\x89PNG torn")
    (tmp_path / "images" / "000013.png").write_bytes((tmp_path / "images" / "000001.png").read_bytes())
    assert merge_samples(tmp_path) is None  # incomplete: nothing merged

    resumed = run(model, tmp_path, decode, batch_size=6)  # another batch size is fine for a fixed-step solver
    assert resumed.complete and resumed.sampled == N - 12 and resumed.skipped == 12
    with np.load(resumed.npz) as z:
        assert np.array_equal(z["arr_0"], images)
    spans = sorted(tuple(int(x) for x in p.stem.split("_")[1:]) for p in (tmp_path / "parts").iterdir())
    assert all(spans[k][1] == spans[k + 1][0] for k in range(len(spans) - 1)) and spans[0][0] == 0 \
        and spans[-1][1] == N  # every index in exactly one part
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{i:06d}.png" for i in range(N)]
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / "000013.png")), images[13])
    again = run(model, tmp_path, decode, batch_size=4)  # complete: nothing to do
    assert again.complete and again.sampled == 0 and again.skipped == N


def test_resume_checks_settings_locks_and_parts(model, decode, tmp_path):
    run(model, tmp_path / "a", decode, n=4, batch_size=4)
    with pytest.raises(FidSamplingError, match=r"other settings \(seed differ\)"):
        run(model, tmp_path / "a", decode, n=4, batch_size=4, cfg=tiny_config("sample.seed=1"))
    cfg = tiny_config("sample.method=dopri5", "sample.guidance=none", "sample.atol=1e-2", "sample.rtol=1e-2")
    with pytest.raises(Killed):
        run(model, tmp_path / "d", decode, n=4, batch_size=2, cfg=cfg, after_part=interrupt)
    with pytest.raises(FidSamplingError, match="adaptive solver 'dopri5'.*batch size 2"):
        run(model, tmp_path / "d", decode, n=4, batch_size=3, cfg=cfg)
    # A merge lock left by a dead process on this host is broken.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    (tmp_path / "d" / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    res = run(model, tmp_path / "d", decode, n=4, batch_size=2, cfg=cfg)
    assert res.complete and not (tmp_path / "d" / LOCK).exists()
    # A torn part (not written by us: ours are renamed into place complete) is named, and the lock released.
    assert not run(model, tmp_path / "t", decode, n=4, batch_size=2, merge=False).complete
    (tmp_path / "t" / "parts" / "part_000002_000004.npz").write_bytes(b"PK\x03\x04")
    with pytest.raises(FidSamplingError, match="part_000002_000004.npz cannot be read.*delete it"):
        merge_samples(tmp_path / "t")
    assert not (tmp_path / "t" / LOCK).exists() and not list((tmp_path / "t").glob(".tmp_*"))


def test_cli_on_a_trained_checkpoint(tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    train = subprocess.run([sys.executable, "tools/train.py", "--config", "configs/demo/digits.yaml", *TINY,
                            "train.max_steps=2", f"train.output_dir={tmp_path / 'run'}"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    cli = [sys.executable, "tools/sample_fid.py", str(ckpt), "--num-images", "20", "--batch", "8",
           "--out", str(tmp_path / "fid")]
    done = subprocess.run(cli, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "merged into" in done.stdout
    with np.load(tmp_path / "fid" / "samples_20x16x16x3.npz") as z:
        assert z["arr_0"].shape == (20, 16, 16, 3) and np.bincount(z["arr_1"]).tolist() == [2] * 10
    info = json.loads((tmp_path / "fid" / "fid_samples.json").read_text())
    assert info["settings"]["checkpoint"] == str(ckpt.resolve()) and info["settings"]["sample.method"] == "heun2"

    from tools.sample_fid import main
    x = ["--out", str(tmp_path / "x")]
    for argv, why in [([str(tmp_path / "missing"), "--num-images", "4", *x], "checkpoint not found"),
                      ([str(ckpt), "--num-images", "0", *x], "must be >= 1"),
                      ([str(ckpt), "--num-images", "20", "--out", str(tmp_path / "fid"), "sample.seed=3"],
                       "other settings"),
                      ([str(ckpt), "--num-images", "4", *x, "data.source=shards", f"data.path={tmp_path}"],
                       "needs the texture VAE"),
                      ([str(ckpt), "--num-images", "4", *x, "sample.method=nope"], "sample.method must be one of")]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and why in err[0], err
