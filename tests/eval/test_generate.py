"""Sampling a checkpoint to pictures: a run trained on latent shards carries its latent statistics, so
tools/sample.py decodes its samples with the texture VAE without the dataset; --config layers onto the run's
config; model and decoding go to the GPU when one is visible; checkpoints without statistics (older ones,
official weights) decode with data.path or sample.latent_stats, or fail with one line naming both."""
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfd_scale import checkpoint_store as store
from sfd_scale.config import ConfigError, to_yaml
from sfd_scale.data.decoding import LATENT_STATS, TextureDecoder, shard_latent_stats
from sfd_scale.data.encoders import TextureVAE
from sfd_scale.eval.generate import load_sampling_model, prepare_sampling, resolve_checkpoint, save_sample_grid
from tests.data.test_shards import write_toy_shards
from tools.sample import main as sample_main

RUN = ["data.source=shards", "data.canonical_nodes=2", "data.num_workers=0", "sfd.texture_chans=4",
       "sfd.semantic_chans=2", "model.name=LightningDiT-S/1", "model.depth=2", "model.hidden_size=64",
       "model.num_heads=4", "model.input_size=2", "model.num_classes=10", "train.global_batch_size=8",
       "train.max_steps=2", "train.log_every=1", "train.device=cpu", "logging.wandb_mode=disabled",
       "logging.progress=false", "optim.lr=1e-3", "parallel.engine=plain", "sample.method=euler",
       "sample.num_steps=2", "sample.grid_images=2"]
GRID = (134, 68)  # 2 images of 32x32 (2x2 latents, f16 VAE), 1 px padding, scaled 2x: (2*33+1)*2 x (33+1)*2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(shards, texture VAE, checkpoint) of a 2-step run on toy shards, with a private TMPDIR for streaming."""
    from sfd_scale.config import load_config
    from sfd_scale.streaming_leases import reclaim_stale
    from sfd_scale.train.trainer import Trainer

    root = tmp_path_factory.mktemp("gen")
    write_toy_shards(root / "shards", n=40, chunk=16)
    TextureVAE.random_init(seed=0, latent_channels=4).vae.save_pretrained(str(root / "vae"))
    tmp = Path(tempfile.mkdtemp(prefix="sfd_", dir="/tmp"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp))
        mp.setattr(tempfile, "tempdir", str(tmp))
        cfg = load_config([], RUN + [f"data.path={root / 'shards'}", f"train.output_dir={root / 'run'}",
                                     f"sample.texture_vae={root / 'vae'}"])
        Trainer(cfg).fit()
    reclaim_stale()
    shutil.rmtree(tmp, ignore_errors=True)
    return root / "shards", root / "vae", store.latest(root / "run")


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def expected_grid(run, tmp_path_factory):
    """The grid of the checkpoint's EMA model decoded with the shards' own statistics, built by hand."""
    shards, vae, ckpt = run
    model, cfg, _ = load_sampling_model(ckpt)
    decode = TextureDecoder(vae, shard_latent_stats(shards, cfg.data), cfg.sfd.texture_chans)
    torch.manual_seed(cfg.sample.seed)
    return png(save_sample_grid(model, cfg, str(tmp_path_factory.mktemp("exp") / "grid.png"), decode=decode))


def test_training_grid_and_checkpoint_carry_the_decoder_and_statistics(run):
    shards, _, ckpt = run
    grid = png(ckpt.parent.parent / "samples" / "final.png")
    assert (grid.shape[1], grid.shape[0]) == GRID and grid.shape[2] == 3  # decoded, not 2x2 latent previews
    assert "false-colour" not in (ckpt.parent.parent / "log.txt").read_text()
    stored = store.read_object(ckpt, LATENT_STATS)
    want = shard_latent_stats(shards, load_sampling_model(ckpt).cfg.data)
    assert torch.equal(stored["latents_mean"], want.latents_mean)
    assert torch.equal(stored["latents_std"], want.latents_std)
    assert stored["latent_norm"] is True and stored["latent_multiplier"] == 1.0


def test_sample_tool_decodes_pngs_without_data_path(run, expected_grid, tmp_path):
    _, vae, ckpt = run
    out = tmp_path / "grid.png"
    assert sample_main([str(ckpt), "--out", str(out), "data.path=null", f"sample.texture_vae={vae}"]) == 0
    grid = png(out)
    assert (grid.shape[1], grid.shape[0]) == GRID
    np.testing.assert_array_equal(grid, expected_grid)  # decoded with the statistics the run trained with


def test_config_files_layer_onto_the_checkpoint_config(run, tmp_path):
    _, _, ckpt = run
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("sample:\n  method: heun2\n  num_steps: 3\n  cfg_scale: 1.5\n")
    model, cfg, stats = load_sampling_model(ckpt, [str(recipe)], ["sample.num_steps=5", "data.path=null"])
    assert cfg.model.depth == 2 and cfg.model.hidden_size == 64 and cfg.data.source == "shards"  # the run's
    assert cfg.sample.method == "heun2" and cfg.sample.cfg_scale == 1.5  # the file's
    assert cfg.sample.num_steps == 5 and cfg.data.path is None  # the overrides'
    assert stats is not None and model.args.depth == 2
    assert sample_main([str(ckpt), "--config", str(recipe), "--out", str(tmp_path / "g.png"), "data.path=null"]) == 0
    assert png(tmp_path / "g.png").shape[:2] == GRID[::-1]


def test_without_texture_vae_the_grid_is_a_latent_preview_and_says_so(run, tmp_path, capsys):
    _, _, ckpt = run
    assert sample_main([str(ckpt), "--out", str(tmp_path / "p.png"), "data.path=null", "sample.texture_vae=null"]) == 0
    assert "false-colour view" in capsys.readouterr().err
    assert png(tmp_path / "p.png").shape[:2] == (128, 224)  # 2x2 latents, scaled 32x: (3+1)*32 x (2*3+1)*32


def test_model_and_decoding_go_to_the_gpu_when_one_is_visible(run, monkeypatch):
    """CPU CI: CUDA is reported present and ``Module.to`` records instead of moving, so no CUDA call is made."""
    _, vae, ckpt = run
    moved = []

    def record(module, *args, **kwargs):
        moved.append((type(module).__name__, args[0] if args else kwargs.get("device")))
        return module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.nn.Module, "to", record)
    sampling = prepare_sampling(ckpt, overrides=["data.path=null", "train.device=auto", f"sample.texture_vae={vae}"])
    assert sampling.device == torch.device("cuda", 0)
    assert ("LightningDiT", torch.device("cuda", 0)) in moved
    sampling.decode.vae(sampling.device)  # the VAE goes where the latents are: the sampling device
    assert moved[-1] == ("AutoencoderKL", torch.device("cuda", 0))
    moved.clear()
    assert prepare_sampling(ckpt, overrides=["data.path=null", "train.device=cpu"]).device == torch.device("cpu")
    assert ("LightningDiT", torch.device("cpu")) in moved
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train.device is 'cuda' but no GPU is available"):
        prepare_sampling(ckpt, overrides=["data.path=null", "train.device=cuda"])


def test_checkpoints_without_statistics(run, expected_grid, tmp_path, capsys):
    """An older checkpoint (no latent_stats object) and official weights decode with data.path or
    sample.latent_stats; without either, one clear line names both."""
    from sfd_scale.train import convert

    shards, vae, ckpt = run
    cfg = load_sampling_model(ckpt).cfg
    official = convert.native_to_official(ckpt, tmp_path / "official.pt")
    old = convert.official_to_native(official, cfg, tmp_path / "old")
    assert LATENT_STATS not in store.stored_keys(old)
    out = tmp_path / "old.png"
    assert sample_main([str(old), "--out", str(out)]) == 0  # its config names data.path
    np.testing.assert_array_equal(png(out), expected_grid)

    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text(to_yaml(cfg).replace(f"path: {shards}", "path: null"))
    for argv in ([str(old), "--out", str(out), "data.path=null"], [str(official), "--config", str(model_yaml)]):
        assert sample_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "data.path" in err[0] and "sample.latent_stats" in err[0], err
    assert sample_main([str(official), "--config", str(model_yaml), "--out", str(out),
                        f"sample.latent_stats={shards / 'stats.safetensors'}"]) == 0
    np.testing.assert_array_equal(png(out), expected_grid)


def test_a_run_directory_stands_for_its_newest_checkpoint(run, tmp_path):
    _, _, ckpt = run
    run_dir = ckpt.parent.parent
    assert resolve_checkpoint(run_dir) == ckpt and resolve_checkpoint(ckpt) == ckpt
    by_run, by_step = load_sampling_model(run_dir, overrides=["data.path=null"]), load_sampling_model(ckpt)
    weights = [(a, b) for a, b in zip(by_run.model.state_dict().values(), by_step.model.state_dict().values())
               if isinstance(a, torch.Tensor)]
    assert weights and all(torch.equal(a, b) for a, b in weights)
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no verified checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
