"""Semantic VAE: model shapes and size, loss, checkpoint file, config, training loop, resume, MDS shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sfd_scale.config import ConfigError
from sfd_scale.semvae.model import (SemanticVAE, SemVAEArgs, SemVAECheckpointError, feature_cosine, load_semvae,
                                   save_semvae, semvae_loss, semvae_metadata)
from sfd_scale.semvae.train import load_semvae_config, semvae_lr, train_semvae

REPO = Path(__file__).resolve().parents[2]
TINY = SemVAEArgs(width=32, depth=1, num_heads=2)


def tiny_cfg(tmp_path: Path, *overrides: str):
    """The tiny CPU config made smaller still: width 32, batch 4, 8x8 token grid (random source)."""
    return load_semvae_config([str(REPO / "configs/semvae/tiny_cpu.yaml")], [
        "model.width=32", "train.batch_size=4", "data.grid_size=8", "data.eval_size=4", "train.log_every=1",
        f"train.output_dir={tmp_path / 'run'}", *overrides])


def test_shapes_and_loss_terms():
    torch.manual_seed(0)
    model = SemanticVAE(TINY)
    feats = torch.randn(2, 768, 16, 16)
    posterior = model.encode(feats)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 16, 16, 16)
    assert model.decode(posterior.sample()).shape == (2, 768, 16, 16)
    rec, posterior = model(feats)
    assert rec.shape == feats.shape
    terms = semvae_loss(feats, rec, posterior, kl_weight=1e-7)
    assert set(terms) == {"total", "mse", "cos", "kl"} and all(v.dim() == 0 for v in terms.values())
    expected = terms["mse"] + terms["cos"] + 1e-7 * terms["kl"]
    torch.testing.assert_close(terms["total"], expected)
    torch.testing.assert_close(terms["mse"], torch.nn.functional.mse_loss(rec, feats))
    torch.testing.assert_close(terms["kl"], posterior.kl().mean())  # diffusers' KL, summed over (C, H, W)
    assert feature_cosine(feats, feats).item() == pytest.approx(1.0, abs=1e-5)
    assert feature_cosine(feats, -feats).item() == pytest.approx(-1.0, abs=1e-5)


def test_paper_size_is_29m_per_half():
    with torch.device("meta"):
        model = SemanticVAE(SemVAEArgs())
    for half in (model.encoder, model.decoder):
        n = sum(p.numel() for p in half.parameters())
        assert abs(n - 29e6) < 1e6, n


def test_encode_latent_mean_by_default():
    torch.manual_seed(0)
    model = SemanticVAE(TINY).eval()
    feats = torch.randn(2, 768, 4, 4)
    with torch.no_grad():
        z1, z2 = model.encode_latent(feats), model.encode_latent(feats)
        assert torch.equal(z1, z2) and torch.equal(z1, model.encode(feats).mean)
        s1 = model.encode_latent(feats, sample=True, generator=torch.Generator().manual_seed(1))
        s2 = model.encode_latent(feats, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.equal(s1, z1)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SemanticVAE(TINY)
    path = save_semvae(tmp_path / "vae.safetensors", model, TINY, {"step": 7, "feature_cos": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae.safetensors"]  # no temp files left
    loaded, args = load_semvae(path)
    assert args == TINY and not loaded.training
    ref = model.state_dict()
    assert ref.keys() == loaded.state_dict().keys()
    assert all(torch.equal(ref[k], v) for k, v in loaded.state_dict().items())
    assert semvae_metadata(path) == {"step": 7, "feature_cos": 0.5}
    feats = torch.randn(1, 768, 4, 4)
    with torch.no_grad():
        assert torch.equal(model.eval().decode(model.encode_latent(feats)), loaded.decode(loaded.encode_latent(feats)))


def test_checkpoint_errors_name_file_and_key(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(SemVAECheckpointError, match="nope.safetensors"):
        load_semvae(missing)
    path = save_semvae(tmp_path / "vae.safetensors", SemanticVAE(TINY), TINY, {})
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    del tensors["decoder.proj_out.bias"]
    tensors["encoder.proj_in.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(SemVAECheckpointError) as err:
        load_semvae(path)
    msg = str(err.value)
    assert "vae.safetensors" in msg and "decoder.proj_out.bias" in msg and "encoder.proj_in.weight" in msg
    save_file(tensors, str(path))  # no metadata at all
    with pytest.raises(SemVAECheckpointError, match="semvae_args"):
        load_semvae(path)


def test_config_errors_name_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_semvae_config([], ["optim.lrr=1e-4"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_semvae_config([], ["train.batch_size=many"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: 64\n")
    with pytest.raises(ConfigError, match="model.widht"):
        load_semvae_config([str(bad)])
    paper = str(REPO / "configs/semvae/dinov2_b_reg.yaml")
    with pytest.raises(ConfigError, match="data.path"):
        load_semvae_config([paper])
    cfg = load_semvae_config([paper], ["data.path=/data/feats"])
    assert (cfg.model, cfg.train.batch_size, cfg.optim.lr, cfg.optim.kl_weight) == (SemVAEArgs(), 64, 5e-5, 1e-7)
    from tools.train_semvae import main

    assert main(["--config", paper, "train.seed=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "train.seed" in err and len(err.splitlines()) == 1


def test_lr_schedule():
    cfg = load_semvae_config([str(REPO / "configs/semvae/dinov2_b_reg.yaml")], ["data.path=x"])
    assert semvae_lr(0, cfg) == pytest.approx(5e-5 / 500)
    assert semvae_lr(499, cfg) == semvae_lr(500, cfg) == semvae_lr(799_999, cfg) == 5e-5
    assert semvae_lr(900_000, cfg) == pytest.approx((5e-5 + 5e-6) / 2)
    assert semvae_lr(1_000_000, cfg) == pytest.approx(5e-6)
    assert all(semvae_lr(s, cfg) >= semvae_lr(s + 1000, cfg) for s in range(800_000, 999_000, 1000))


def test_training_reduces_loss(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.max_steps=30", "optim.total_steps=30", "optim.constant_until=25",
                   "train.eval_every=0")
    summary = train_semvae(cfg)
    losses = [loss for _, loss in summary["loss_history"]]
    assert len(losses) == 30 and summary["steps"] == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert summary["feature_cos"] > 0.5
    assert Path(summary["checkpoint"]).name == "semvae.safetensors"
    _, args = load_semvae(summary["checkpoint"])
    assert args == cfg.model and semvae_metadata(summary["checkpoint"])["step"] == 30
    assert (tmp_path / "run" / "semvae_step_0000030.safetensors").is_file()


def test_resume_is_bit_identical(tmp_path):
    common = ("optim.warmup_steps=3", "optim.constant_until=8", "optim.total_steps=12", "train.eval_every=0")
    straight = train_semvae(tiny_cfg(tmp_path / "a", "train.max_steps=12", *common))
    first = train_semvae(tiny_cfg(tmp_path / "b", "train.max_steps=6", *common))
    resumed = train_semvae(tiny_cfg(tmp_path / "b", "train.max_steps=12", *common))
    assert (first["steps"], resumed["steps_this_run"], resumed["steps"]) == (6, 6, 12)
    a, b = load_file(straight["checkpoint"]), load_file(resumed["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight["last_loss"] == resumed["last_loss"]
    with pytest.raises(ConfigError, match="semvae_state.pt"):  # same directory, different model
        train_semvae(tiny_cfg(tmp_path / "b", "train.max_steps=13", "model.depth=2", *common))


def test_shards_source(tmp_path, streaming_tmp):
    from streaming import MDSWriter

    data = tmp_path / "mds"
    rng = np.random.default_rng(0)
    columns = {"feats_dino": "ndarray:float16:768,8,8", "feats_dino_flip": "ndarray:float16:768,8,8"}
    with MDSWriter(out=str(data), columns=columns) as writer:
        for _ in range(10):
            f = rng.standard_normal((768, 8, 8)).astype(np.float16)
            writer.write({"feats_dino": f, "feats_dino_flip": f[:, :, ::-1].copy()})
    cfg = tiny_cfg(tmp_path, "data.source=shards", f"data.path={data}", "data.num_workers=0",
                   "train.max_steps=4", "train.eval_every=2")
    summary = train_semvae(cfg)  # 10 samples, batch 4, drop_last: step 3 starts a second epoch
    assert summary["steps"] == 4 and np.isfinite(summary["last_loss"]) and -1 <= summary["feature_cos"] <= 1
    shards = ("data.source=shards", f"data.path={data}", "data.num_workers=0", "train.eval_every=0")
    train_semvae(tiny_cfg(tmp_path / "b", *shards, "train.max_steps=3"))  # resume mid-epoch 2 continues the stream
    resumed = train_semvae(tiny_cfg(tmp_path / "b", *shards, "train.max_steps=4"))
    a, b = load_file(summary["checkpoint"]), load_file(resumed["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="index.json"):
        train_semvae(tiny_cfg(tmp_path, "data.source=shards", f"data.path={tmp_path / 'none'}"))


def test_images_source_random_crops_and_exact_resume(tmp_path, capsys):
    """Online from an image folder (real photos, tiny random DINOv2, DALI on the CPU): the crops are random (step
    to step, scale and place) but a pure function of (seed, step); a resumed run is bit-identical; the held-out
    batch is the extraction's centre crop."""
    from sfd_scale.data.extract import load_crops
    from sfd_scale.data.semvae_images import ImageFeatures, random_crops
    from tests.data.online_data import photo_tree
    from tools.train_semvae import main

    tree = photo_tree(tmp_path / "photos")
    images = ("data.source=images", f"data.path={tree}", "data.dino_random_init=true", "data.resolution=64",
              "data.eval_size=2", "data.num_workers=1", "train.eval_every=0", "optim.warmup_steps=2",
              "optim.constant_until=4", "optim.total_steps=6")
    source = ImageFeatures(tiny_cfg(tmp_path, *images), torch.device("cpu"))
    first, again, second = source.crops(0), source.crops(0), source.crops(1)
    assert first.shape == (4, 64, 64, 3) and torch.equal(first, again) and not torch.equal(first, second)
    shorter, x, y = random_crops(0, 0, 64, 64, 0.8)
    assert min(shorter) >= 64 and max(shorter) <= 80 and len(set(shorter)) > 5 and 0 <= min(x) < max(y) < 1
    assert random_crops(1, 0, 4, 64, 0.8) != random_crops(0, 0, 4, 64, 0.8)
    assert torch.equal(source.encoder(load_crops(source.eval_files, 64)), source.eval_batch())
    straight = train_semvae(tiny_cfg(tmp_path / "a", *images, "train.max_steps=6"), ImageFeatures)
    train_semvae(tiny_cfg(tmp_path / "b", *images, "train.max_steps=3"), ImageFeatures)
    resumed = train_semvae(tiny_cfg(tmp_path / "b", *images, "train.max_steps=6"), ImageFeatures)
    assert resumed["steps_this_run"] == 3 and np.isfinite(straight["last_loss"])
    a, b = load_file(straight["checkpoint"]), load_file(resumed["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="data.dino"):
        load_semvae_config([], ["data.source=images", f"data.path={tree}"])
    with pytest.raises(ConfigError, match="needs the image feature source"):
        train_semvae(tiny_cfg(tmp_path / "c", *images))
    argv = ["--config", str(REPO / "configs/semvae/tiny_cpu.yaml"), "model.width=32", "train.batch_size=4",
            "train.max_steps=1", f"train.output_dir={tmp_path / 'tool'}", *images]
    assert main(argv) == 0 and "on images features for 1 steps" in capsys.readouterr().out
