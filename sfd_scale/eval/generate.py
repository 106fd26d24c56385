"""Generate latents / images from a trained model with the configured sampler and guidance."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..config import Config, ConfigError, guidance_config, sampler_config, sfd_spec
from ..data.demo import save_image_grid
from ..errors import MissingInputError
from ..diffusion.sampling import Sampler


def generate_latents(model: Callable, cfg: Config, labels: torch.Tensor, *, guide: Optional[Callable] = None,
                     seed: int = 0, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Final composite latents (all channels) for ``labels``; initial noise drawn from ``seed``."""
    spec = sfd_spec(cfg)
    args = model.args
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(labels), spec.channels, args.input_size, args.input_size, generator=g).to(device)
    sampler = Sampler(model, spec, sampler_config(cfg), guidance_config(cfg), guide=guide,
                      null_class=args.num_classes)
    return sampler.sample(z, labels.to(device))


def latent_preview(latents: torch.Tensor, texture_chans: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) view of the first three texture channels, for data without a decoder."""
    x = latents[:, : min(3, texture_chans)].float()
    lo = x.amin(dim=(0, 2, 3), keepdim=True)
    hi = x.amax(dim=(0, 2, 3), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-6) * 255).round().to(torch.uint8)
    if x.shape[1] < 3:
        x = x[:, :1].expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous()


def save_sample_grid(model: Callable, cfg: Config, path: Optional[str], *, decode: Optional[Callable] = None,
                     guide: Optional[Callable] = None, num_classes: Optional[int] = None,
                     device: torch.device = torch.device("cpu")) -> str:
    """PNG grid of ``sample.grid_images`` samples, labels cycling over the classes (not written when
    ``path`` is None: the other ranks of a collective sampling run)."""
    n = cfg.sample.grid_images
    classes = num_classes or model.args.num_classes
    labels = torch.arange(n) % classes
    latents = generate_latents(model, cfg, labels, guide=guide, seed=cfg.sample.seed, device=device).cpu()
    if path is None:
        return None
    images = decode(latents) if decode is not None else latent_preview(latents, sfd_spec(cfg).texture_chans)
    nrow = min(classes, n) if classes <= 16 else 8
    return save_image_grid(images, path, nrow=nrow)


def load_guide(cfg: Config, device: torch.device = torch.device("cpu")):
    """The autoguidance guide: registry size ``sample.guide_model`` with the main model's latent layout,
    weights from the ``ema`` of ``sample.guide_checkpoint`` (REPA projector kept if the file has one)."""
    from dataclasses import replace

    from ..config import model_args
    from ..models.lightningdit import LightningDiT, parallel_config, parse_model_name
    from ..models.official import load_official_state_dict, read_checkpoint
    from ..parallel.layout import current_tensor_parallel

    if not cfg.sample.guide_model:
        raise ValueError("sample.guide_model (e.g. LightningDiT-B/1) is required for autoguidance")
    state = read_checkpoint(cfg.sample.guide_checkpoint, which="ema")
    depth, hidden, heads, patch = parse_model_name(cfg.sample.guide_model)
    args = replace(model_args(cfg), depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch,
                   use_repa=any(k.startswith("repa_projector.") for k in state))
    if args.use_repa:
        args = replace(args, repa_projector_dim=state["repa_projector.0.weight"].shape[0],
                       repa_feature_dim=state["repa_projector.4.weight"].shape[0])
    guide = LightningDiT(args, parallel_config(tensor_parallel=current_tensor_parallel()))  # sharded like the model
    load_official_state_dict(guide, state)
    return guide.to(device).eval()


def default_decoder(cfg: Config, device=None, texture_vae: Optional[str] = None) -> Callable:
    """latents -> uint8 (B, H, W, C) images: the training data's own decoder where it has one (the demo's fixed
    decoder), else the texture VAE (``sample.texture_vae``)."""
    if cfg.data.source == "demo":
        from ..data.sources import build_training_data
        return build_training_data(cfg).decode
    path = texture_vae or cfg.sample.texture_vae
    if not path:
        raise ConfigError(f"decoding data.source={cfg.data.source!r} samples needs the texture VAE: set "
                               f"sample.texture_vae (tools/sample_fid.py --texture-vae)")
    return texture_decoder(cfg, path, device)


def texture_decoder(cfg: Config, path, device=None, dtype: torch.dtype = torch.float32) -> Callable:
    """Undo the training normalisation of the texture channels (``x * std / multiplier + mean``, as the official
    inference) with ``cfg.data``'s statistics, then decode with the texture VAE at ``path``."""
    from ..data.demo import images_to_uint8
    from ..data.encoders import TextureVAE

    d, c = cfg.data, cfg.sfd.texture_chans
    vae = TextureVAE.from_pretrained(path).vae.to(device or "cpu", dtype)
    if vae.config.latent_channels != c:
        raise ConfigError(f"texture VAE {path} has {vae.config.latent_channels} latent channels, "
                               f"sfd.texture_chans is {c}")
    mean = std = None
    if d.latent_norm:
        if d.source == "shards":
            from ..data.shards import read_stats
            stats = read_stats(d.path)
            mean, std = stats["latents_mean"], stats["latents_std"]
        else:
            from ..data.official import OfficialLatentDataset
            ds = OfficialLatentDataset(d.path, latent_norm=True, latent_sv_norm=False)
            mean, std = ds.latent_mean, ds.latent_std
        mean, std = mean.float().reshape(1, -1, 1, 1), std.float().reshape(1, -1, 1, 1)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        x = latents[:, :c].float()
        x = x * std.to(x.device) / d.latent_multiplier + mean.to(x.device) if mean is not None \
            else x / d.latent_multiplier
        return images_to_uint8(vae.decode(x.to(vae.device, dtype)).sample.float())
    return decode


def load_sampling_model(checkpoint, config_files: Sequence[str] = (), overrides: Sequence[str] = ()):
    """(eval-mode model with the EMA weights, config) from an sfd_scale checkpoint directory (its own config,
    overrides on top; or ``config_files``) or an official .pt / .safetensors (``config_files`` required)."""
    from ..config import config_from_dict, load_config, model_args
    from ..models.lightningdit import LightningDiT
    from ..models.official import load_official_state_dict, read_checkpoint
    from .. import checkpoint_store as store

    path = Path(checkpoint)
    if not path.exists():
        raise MissingInputError(f"checkpoint not found: {path}")
    if path.is_dir():
        cfg = (load_config(config_files, overrides) if config_files
               else config_from_dict(store.read_object(path, "config"), overrides))
        weights = store.read_weights(path, "ema")
    else:
        if not config_files:
            raise ConfigError(f"{path} is not an sfd_scale checkpoint directory: give --config for its model")
        cfg, weights = load_config(config_files, overrides), read_checkpoint(path, which="ema")
    model = LightningDiT(model_args(cfg))
    load_official_state_dict(model, weights)
    return model.eval(), cfg
