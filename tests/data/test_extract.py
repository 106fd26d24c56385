"""Latent extraction end to end on a tiny image tree with tiny random encoders (64x64 crops -> 4x4 latents):
contents and statistics against direct encoder calls, SIGKILL + resume, two ranks, configuration errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sfd_scale.config import ConfigError
from sfd_scale.data import shards
from sfd_scale.data.encoders import CompositeEncoder, image_generators
from sfd_scale.data.extract import (LOCK_FILE, PAUSE_ENV, claim_output, extract, list_inputs, load_crops,
                                    load_extract_config, rank_world)
from tools import extract_latents as extract_tool

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "extract" / "tiny_cpu.yaml")
CHUNK, BATCH, N = 3, 2, 12  # 4 parts; batches of 2 + 1 inside each chunk


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """3 classes x 4 images: several sizes and aspect ratios (one smaller than the crop), RGB / gray / RGBA,
    JPEG and PNG."""
    from skimage import data
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("images")
    astro = data.astronaut()
    arrays = {
        "c_dog": [astro, data.chelsea(), rng.integers(0, 256, (97, 61, 3), dtype=np.uint8), data.camera()],
        "a_cat": [data.coffee(), data.rocket(), rng.integers(0, 256, (64, 200, 3), dtype=np.uint8),
                  rng.integers(0, 256, (80, 80, 4), dtype=np.uint8)],
        "b_fox": [astro[:300], astro[100:, :150], rng.integers(0, 256, (48, 70, 3), dtype=np.uint8), astro[::3, ::2]],
    }
    for cls, arrs in arrays.items():
        (root / cls).mkdir()
        for i, a in enumerate(arrs):
            ext = "png" if (i % 2 or a.ndim == 2 or a.shape[-1] == 4) else "jpg"
            Image.fromarray(a).save(root / cls / f"img{i}.{ext}", quality=95)
    (root / "a_cat" / "notes.txt").write_text("not an image")
    return root


def main(argv) -> dict:
    """One extraction as ``sfd extract ARGV`` runs it (``sfd_scale/apps/extract.py``), returning its summary."""
    files = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return extract(load_extract_config(files, overrides), *rank_world(), finalize_only="--finalize-only" in argv)


def args(tree, out, *extra):
    return ["--config", TINY, f"input={tree}", f"output={out}", f"chunk_size={CHUNK}", f"batch_size={BATCH}",
            "progress=false", *extra]


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ds"
    summary = main(args(tree, out))
    assert summary["finalized"] and summary["images"] == N and summary["parts"] == N // CHUNK
    return out


pytestmark = pytest.mark.usefixtures("streaming_tmp")


def read_all(root) -> list:
    """Every sample in dataset order (copies: streaming hands out read-only arrays)."""
    from streaming import StreamingDataset
    from sfd_scale.streaming_leases import StreamingLease
    lease = StreamingLease.acquire()
    ds = StreamingDataset(local=str(root), shuffle=False, batch_size=1)
    lease.record(ds)
    try:
        return [{k: np.array(v) for k, v in ds[i].items()} for i in range(len(ds))]
    finally:
        lease.release(ds)
        del ds


def assert_same(a: list, b: list, exact: bool = True):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if exact or x[k].dtype.kind == "i":
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
            else:
                np.testing.assert_allclose(x[k], y[k], rtol=1e-4, atol=1e-5, err_msg=k)


def no_leftovers(root: Path):
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp") or p.name == LOCK_FILE]


def adm_center_crop(path, size) -> np.ndarray:
    """ADM's PIL recipe: box-halve while the short side >= 2 size, bicubic to short side = size, center crop."""
    img = Image.open(path).convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    a = np.array(img)
    y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y:y + size, x:x + size]


def test_contents_and_stats(tree, reference):
    inputs = list_inputs(tree)
    assert inputs.classes == ["a_cat", "b_fox", "c_dog"] and len(inputs.files) == N
    samples = read_all(reference)
    assert [int(s["source_index"][0]) for s in samples] == list(range(N))
    assert [int(s["label"]) for s in samples] == [0] * 4 + [1] * 4 + [2] * 4
    meta = json.loads((reference / shards.META_FILE).read_text())
    assert meta["num_samples"] == N and meta["classes"] == inputs.classes and meta["parts"] == N // CHUNK

    crops = load_crops(inputs.files, 64)
    assert crops.shape == (N, 64, 64, 3) and crops.dtype == torch.uint8
    for f, c in zip(inputs.files, crops):  # the DALI crop is ADM's center crop up to resampling differences
        assert np.abs(c.numpy().astype(float) - adm_center_crop(f, 64)).mean() < 6.0, f
    # the encoders run directly on the same crops and flips, with the extraction's batch composition
    enc = CompositeEncoder.random_init(0)
    for k in range(N // CHUNK):
        for start in range(k * CHUNK, (k + 1) * CHUNK, BATCH):
            idx = list(range(start, min(start + BATCH, (k + 1) * CHUNK)))
            x = torch.cat([crops[idx], crops[idx].flip(2)])
            out = enc.encode(x, True, image_generators(0, idx, False) + image_generators(0, idx, True))
            for j, i in enumerate(idx):
                s, b = samples[i], len(idx)
                for key in ("latents", "latents_sv"):
                    assert np.array_equal(s[key], out[key][j].numpy()), (key, i)
                    assert np.array_equal(s[key + "_flip"], out[key][b + j].numpy()), (key, i)
                assert np.array_equal(s["feats_dino"], out["feats_dino"][j].half().numpy())
                assert np.array_equal(s["feats_dino_flip"], out["feats_dino"][b + j].half().numpy())
    stats = load_file(str(reference / shards.STATS_FILE))
    for key in ("latents", "latents_sv"):
        x = torch.from_numpy(np.stack([s[key] for s in samples])).double()
        mean, std = x.mean(dim=(0, 2, 3)), x.transpose(0, 1).reshape(x.shape[1], -1).std(dim=1)
        torch.testing.assert_close(stats[f"{key}_mean"].view(-1).double(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats[f"{key}_std"].view(-1).double(), std, rtol=1e-6, atol=1e-6)
    no_leftovers(reference)


def test_sigkill_and_resume(tree, reference, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO), **{PAUSE_ENV: "5"})
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "tools/extract_latents.py", *args(tree, out)], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        while not (out.is_dir() and shards.finished_parts(out)):
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()
            assert time.time() < deadline, "no part appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = shards.finished_parts(out)
    assert 1 <= len(done) < N // CHUNK and not (out / shards.META_FILE).exists()
    stale = shards.parts_dir(out) / f".tmp_{shards.part_name(N // CHUNK - 1)}_999999"  # a writer killed mid-part
    stale.mkdir()
    (stale / "shard.00000.mds").write_bytes(b"partial")
    summary = main(args(tree, out))
    assert summary["finalized"] and summary["parts"] == N // CHUNK - len(done)  # only unfinished chunks redone
    samples = read_all(out)
    assert sorted(int(s["source_index"][0]) for s in samples) == list(range(N))
    assert_same(samples, read_all(reference))
    no_leftovers(out)
    no_leftovers(shards.parts_dir(out))
    again = main(args(tree, out))  # a finished dataset: nothing to do
    assert again["parts"] == 0 and again["finalized"]


def test_two_ranks(tree, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ranks"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    first = main(args(tree, out))
    assert not first["finalized"] and shards.finished_parts(out) == ["part_0000000", "part_0000002"]
    with pytest.raises(ConfigError, match=r"2 of 4 parts missing \(first: part_0000001\)"):  # parts 1 and 3
        main(args(tree, out, "--finalize-only"))
    monkeypatch.setenv("RANK", "1")
    second = main(args(tree, out))
    assert second["finalized"] and second["parts"] == 2  # the last rank to finish finalizes
    monkeypatch.delenv("RANK")  # streaming would read them as a process group
    monkeypatch.delenv("WORLD_SIZE")
    assert_same(read_all(out), read_all(reference))
    assert (out / shards.STATS_FILE).read_bytes() == (reference / shards.STATS_FILE).read_bytes()
    for name in (shards.META_FILE, shards.INDEX_FILE, shards.STATS_FILE):
        (out / name).unlink()
    assert main(args(tree, out, "--finalize-only"))["finalized"]
    assert (out / shards.INDEX_FILE).read_bytes() == (reference / shards.INDEX_FILE).read_bytes()
    no_leftovers(out)


def test_batch_size_and_list_file(tree, reference, tmp_path):
    inputs = list_inputs(tree)
    order = [5, 0, 11]
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{os.path.relpath(inputs.files[i], tree)} {7 + n}\n" for n, i in enumerate(order)))
    out = tmp_path / "listed"
    summary = main(args(tree, out, f"input_list={lst}", "batch_size=1", "features=false", "seed=3"))
    assert summary["finalized"]
    samples, ref = read_all(out), read_all(reference)
    assert [int(s["source_index"][0]) for s in samples] == [0, 1, 2]
    assert [int(s["label"]) for s in samples] == [7, 8, 9] and "feats_dino" not in samples[0]
    for s, i in zip(samples, order):  # semantic latents are posterior means: equal up to batch-size rounding
        np.testing.assert_allclose(s["latents_sv"], ref[i]["latents_sv"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s["latents_sv_flip"], ref[i]["latents_sv_flip"], rtol=1e-4, atol=1e-5)
    # a different batch size does not change a sampled texture latent beyond float rounding
    again = tmp_path / "bs3"
    main(args(tree, again, "batch_size=3"))
    assert_same(read_all(again), ref, exact=False)


def test_config_errors(tree, tmp_path, capsys):
    with pytest.raises(ConfigError, match="bogus"):
        load_extract_config([TINY], ["bogus=1"])
    with pytest.raises(ConfigError, match="resolution"):
        load_extract_config([TINY], ["resolution=abc", f"input={tree}", "output=x"])
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="input folder not found: .*/nowhere"):
        load_extract_config([TINY], [f"input={tmp_path / 'nowhere'}", f"output={out}"])
    with pytest.raises(ConfigError, match="texture_vae weights not found: /no/vae.ckpt"):
        load_extract_config([TINY], [f"input={tree}", f"output={out}", "random_init=false",
                                     "texture_vae=/no/vae.ckpt", "dino=/no/d.pth", "semvae=/no/s.safetensors"])
    assert extract_tool.main(args(tree, out, f"input_list={tmp_path / 'missing.txt'}")) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: input_list file not found") and not out.exists()
    claim_output(out, {"seed": 0, "resolution": 64})
    with pytest.raises(ConfigError, match="different settings.*seed"):
        claim_output(out, {"seed": 1, "resolution": 64})


def test_first_pass_without_semantic_vae(tree, tmp_path):
    """Pass 1 of a real pipeline: no Semantic VAE yet, so texture latents + DINOv2 features only (the features
    train the Semantic VAE); the shards and the loader work without semantic columns."""
    from sfd_scale.data.extract import encode_samples
    from sfd_scale.data.shards import LatentShardDataset

    enc = CompositeEncoder.random_init(0)
    enc.semantic = None
    files = list_inputs(tree).files[:3]
    samples = encode_samples(enc, load_crops(files, 64), [0, 1, 2], [0, 0, 0], seed=0, features=True)
    assert "latents_sv" not in samples[0] and samples[0]["feats_dino"].shape[0] == enc.dino.feature_dim
    with shards.PartWriter(tmp_path / "d", 0) as w:
        for s in samples:
            w.write(s)
    info = shards.finalize(tmp_path / "d", {})
    assert "latents_sv" not in info["columns"] and "feats_dino" in info["columns"]
    item = LatentShardDataset(tmp_path / "d", batch_size=1, shuffle=False, repa=True).read(1, False)
    assert item["latent"].shape == (32, 4, 4) and item["repa"].shape[0] == enc.dino.feature_dim
    # without weights for a Semantic VAE the extraction must at least keep the features
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    with pytest.raises(ConfigError, match="semvae"):
        load_extract_config([], [f"input={tree}", f"output={tmp_path / 'o'}", f"texture_vae={weights}",
                                 f"dino={weights}", "features=false"])
    load_extract_config([], [f"input={tree}", f"output={tmp_path / 'o'}", f"texture_vae={weights}",
                             f"dino={weights}", "features=true"])


def test_random_stand_ins_with_a_trained_semantic_vae(tree, tmp_path):
    """``random_init`` replaces only the downloaded encoders (texture VAE, DINOv2): ``semvae`` null gives a first
    pass without semantic latents, a path loads that Semantic VAE (the recipe's second pass), 'random' a tiny one."""
    from sfd_scale.data.encoders import SemanticEncoder
    from sfd_scale.data.extract import build_encoder
    from sfd_scale.semvae.model import SemanticVAE, SemVAEArgs, save_semvae

    torch.manual_seed(5)
    weights = tmp_path / "semvae.safetensors"
    args = SemVAEArgs(width=32, depth=1, num_heads=2)
    save_semvae(weights, SemanticVAE(args), args)
    base = [f"input={tree}", f"output={tmp_path / 'o'}", "random_init=true"]
    first = build_encoder(load_extract_config([], base), "cpu")
    assert first.semantic is None and first.dino.feature_dim == 768
    second = build_encoder(load_extract_config([], base + [f"semvae={weights}"]), "cpu")
    want = SemanticEncoder.from_pretrained(weights)
    feats = torch.randn(2, 768, 4, 4)
    assert torch.equal(second.semantic(feats), want(feats))
    assert torch.equal(second.texture.vae.encoder.conv_in.weight, first.texture.vae.encoder.conv_in.weight)
    assert build_encoder(load_extract_config([TINY], base), "cpu").semantic is not None  # semvae: random
    with pytest.raises(ConfigError, match="semvae=random needs random_init=true"):
        load_extract_config([], base[:2] + ["semvae=random", "texture_vae=/x", "dino=/x"])
    with pytest.raises(ConfigError, match="semvae weights not found"):
        load_extract_config([], base + [f"semvae={tmp_path / 'none.safetensors'}"])
