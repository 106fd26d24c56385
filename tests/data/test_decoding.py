"""Decoding samples: the latent normalisation undone with the run's statistics, then the texture VAE."""
import pytest
import torch
from safetensors.torch import save_file

from sfd_scale.config import ConfigError, DataConfig
from sfd_scale.data.decoding import LatentStats, TextureDecoder, shard_latent_stats, stats_file_latent_stats
from sfd_scale.data.encoders import TextureVAE


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae"
    TextureVAE.random_init(seed=0, latent_channels=4).vae.save_pretrained(str(path))
    return path


def _expected(vae_dir, x):
    vae = TextureVAE.from_pretrained(vae_dir).vae
    with torch.no_grad():
        y = vae.decode(x).sample
    return ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def test_texture_vae_decoder_undoes_the_shards_normalisation(vae_dir, tmp_path):
    mean, std = torch.randn(1, 4, 1, 1), torch.rand(1, 4, 1, 1) + 0.5
    save_file({"latents_mean": mean, "latents_std": std}, str(tmp_path / "stats.safetensors"))
    stats = shard_latent_stats(tmp_path, DataConfig(latent_multiplier=2.0, latent_sv_norm=False))
    assert stats.latents_mean.shape == (4,) and stats.latent_multiplier == 2.0
    decode = TextureDecoder(vae_dir, stats, texture_chans=4)
    latents = torch.randn(2, 6, 2, 2)
    images = decode(latents)
    assert images.dtype == torch.uint8 and images.shape == (2, 32, 32, 3)  # f16: image, not latent, resolution
    assert torch.equal(images, _expected(vae_dir, latents[:, :4] * std / 2.0 + mean))
    # the checkpoint object form round-trips
    again = LatentStats.from_object(stats.to_object())
    assert torch.equal(TextureDecoder(vae_dir, again, texture_chans=4)(latents), images)


def test_stats_files_of_both_dataset_kinds(vae_dir, tmp_path):
    mean, std = torch.randn(1, 4, 1, 1), torch.rand(1, 4, 1, 1) + 0.5
    torch.save({"mean": mean, "std": std}, tmp_path / "latents_stats.pt")  # the official folder's file
    save_file({"latents_mean": mean, "latents_std": std}, str(tmp_path / "stats.safetensors"))
    d = DataConfig()
    a = stats_file_latent_stats(tmp_path / "latents_stats.pt", d)
    b = stats_file_latent_stats(tmp_path / "stats.safetensors", d)
    assert torch.equal(a.latents_mean, mean.flatten()) and torch.equal(b.latents_std, std.flatten())
    with pytest.raises(ConfigError, match="sample.latent_stats: statistics file .*nope.pt not found"):
        stats_file_latent_stats(tmp_path / "nope.pt", d)
    torch.save({"other": mean}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="holds no texture latent statistics"):
        stats_file_latent_stats(tmp_path / "bad.pt", d)


def test_decoder_checks_channels(vae_dir):
    stats = LatentStats(True, False, 1.0, torch.zeros(3), torch.ones(3))
    with pytest.raises(ConfigError, match="3 texture channels, sfd.texture_chans is 4"):
        TextureDecoder(vae_dir, stats, texture_chans=4)
    with pytest.raises(ConfigError, match="needs the texture latent statistics"):
        TextureDecoder(vae_dir, LatentStats(True, False, 1.0), texture_chans=4)
    wrong = TextureDecoder(vae_dir, LatentStats(False, False, 1.0), texture_chans=8)
    with pytest.raises(ConfigError, match="has 4 latent channels, sfd.texture_chans is 8"):
        wrong(torch.zeros(1, 8, 2, 2))
