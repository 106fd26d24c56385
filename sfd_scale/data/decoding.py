"""From sampled latents back to images: the latent normalisation a run trained with, and the texture VAE decoder.

Training data is normalised per channel (``(x - mean) / std * multiplier``, shards and the official folder alike);
a sample is decoded by undoing that on the texture channels and running the texture VAE's decoder.

``LatentStats`` is the normalisation itself: the settings and the per-channel statistics. The trainer stores it
in every checkpoint (object key ``latent_stats``), so sampling a checkpoint needs neither the dataset nor
``data.path``; an official checkpoint names its dataset (``data.path``) or the dataset's statistics file
(``sample.latent_stats``). ``TextureDecoder`` loads the VAE at its first call, on the device of the latents it
is given (a GPU when sampling runs there), so ranks that never decode never hold the VAE.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError
from .demo import images_to_uint8

LATENT_STATS = "latent_stats"  # the checkpoint object holding ``LatentStats.to_object()`` (train/state.py writes it)


@dataclass
class LatentStats:
    """The normalisation applied to training latents: flags and multiplier as ``data.*``, statistics as flat
    float32 (C,) tensors (None where that normalisation is off or the source has none)."""
    latent_norm: bool
    latent_sv_norm: bool
    latent_multiplier: float
    latents_mean: Optional[torch.Tensor] = None     # texture channels
    latents_std: Optional[torch.Tensor] = None
    latents_sv_mean: Optional[torch.Tensor] = None  # semantic channels (kept for completeness; decoding
    latents_sv_std: Optional[torch.Tensor] = None   # uses the texture channels only)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                setattr(self, f.name, value.detach().float().reshape(-1).cpu())

    def to_object(self) -> dict:
        """A plain dict (``checkpoint_store.pack``-able) for the checkpoint's ``latent_stats`` object."""
        return asdict(self)

    @classmethod
    def from_object(cls, obj: dict) -> "LatentStats":
        return cls(**{f.name: obj.get(f.name) for f in fields(cls)})

    def denormalize_texture(self, x: torch.Tensor) -> torch.Tensor:
        """Texture channels of a sample back in the texture VAE's latent space (as the official inference)."""
        x = x / self.latent_multiplier
        if self.latent_norm:
            x = x * self.latents_std.to(x.device).view(1, -1, 1, 1) + self.latents_mean.to(x.device).view(1, -1, 1, 1)
        return x


def shard_latent_stats(root, data_cfg) -> LatentStats:
    """The statistics of the latent shards at ``root`` (their ``stats.safetensors``) with ``data_cfg``'s flags."""
    from .shards import read_stats

    stats = read_stats(root) if data_cfg.latent_norm or data_cfg.latent_sv_norm else {}
    keys = ("latents_mean", "latents_std", "latents_sv_mean", "latents_sv_std")
    return LatentStats(data_cfg.latent_norm, data_cfg.latent_sv_norm, data_cfg.latent_multiplier,
                       **{k: stats.get(k) for k in keys})


def official_latent_stats(dataset, data_cfg) -> LatentStats:
    """The statistics an ``OfficialLatentDataset`` normalises with (computed and cached by it when missing)."""
    return LatentStats(data_cfg.latent_norm, data_cfg.latent_sv_norm, data_cfg.latent_multiplier,
                       dataset.latent_mean, dataset.latent_std, getattr(dataset, "latent_sv_mean", None),
                       getattr(dataset, "latent_sv_std", None))


def stats_file_latent_stats(path, data_cfg, key: str = "sample.latent_stats") -> LatentStats:
    """``data_cfg``'s flags with the texture statistics of a stats file: the official folder's
    ``latents_stats.pt`` (``{"mean", "std"}``) or the shards' ``stats.safetensors`` (``latents_mean`` / ``_std``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: statistics file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            raw = load_file(str(path))
            mean, std = raw.get("latents_mean"), raw.get("latents_std")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            mean, std = (raw.get("mean"), raw.get("std")) if isinstance(raw, dict) else (None, None)
    except Exception as err:  # torch / safetensors raise many kinds on a foreign file
        raise ConfigError(f"{key}: cannot read statistics file {path}: {err}") from None
    if mean is None or std is None:
        raise ConfigError(f"{key}: {path} holds no texture latent statistics ('mean' / 'std' in an official "
                          f"latents_stats.pt, 'latents_mean' / 'latents_std' in a shards' stats.safetensors)")
    return LatentStats(data_cfg.latent_norm, data_cfg.latent_sv_norm, data_cfg.latent_multiplier, mean, std)


class TextureDecoder:
    """latents (B, C, h, w) -> uint8 images (B, H, W, 3): the texture channels denormalised with ``stats`` and
    decoded by the texture VAE at ``vae_path`` (loaded at the first call, on the latents' device)."""

    def __init__(self, vae_path, stats: LatentStats, texture_chans: int, dtype: torch.dtype = torch.float32):
        if stats.latent_norm and (stats.latents_mean is None or stats.latents_std is None):
            raise ConfigError("decoding needs the texture latent statistics (data.latent_norm is on) but none "
                              "were given")
        if stats.latents_mean is not None and stats.latent_norm and stats.latents_mean.numel() != texture_chans:
            raise ConfigError(f"the latent statistics have {stats.latents_mean.numel()} texture channels, "
                              f"sfd.texture_chans is {texture_chans}")
        self.vae_path, self.stats, self.texture_chans, self.dtype = vae_path, stats, texture_chans, dtype
        self._vae = None

    def vae(self, device: torch.device):
        """The decoder's VAE on ``device`` (loaded once, moved when a later call's latents live elsewhere)."""
        from .encoders import TextureVAE

        if self._vae is None:
            vae = TextureVAE.from_pretrained(self.vae_path).vae
            if vae.config.latent_channels != self.texture_chans:
                raise ConfigError(f"texture VAE {self.vae_path} has {vae.config.latent_channels} latent channels, "
                                  f"sfd.texture_chans is {self.texture_chans}")
            self._vae = vae
        if self._vae.device != device or self._vae.dtype != self.dtype:
            self._vae = self._vae.to(device, self.dtype)
        return self._vae

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae(latents.device)
        x = self.stats.denormalize_texture(latents[:, : self.texture_chans].float())
        return images_to_uint8(vae.decode(x.to(self.dtype)).sample.float())
