"""Generate latents / images from a trained model with the configured sampler and guidance.

Sampling a checkpoint (``prepare_sampling``, used by sfd sample, sfd sample-fid and the study): its own
config with ``--config`` files and ``key=value`` overrides layered on top, its EMA weights, the latent statistics
it carries, and model, guide and decoding on ``train.device`` (the GPU when one is visible). The decoder is the
data's (``data.sources.sampling_decoder``, the same one training-time grids use): the texture VAE when
``sample.texture_vae`` is set, else grids show ``latent_preview``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from ..config import Config, ConfigError, guidance_config, sampler_config, sfd_spec
from ..data.decoding import LATENT_STATS, LatentStats
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
    latents = generate_latents(model, cfg, labels, guide=guide, seed=cfg.sample.seed, device=device)
    if path is None:
        return None
    # decoded where the latents are (the sampling device); the preview only without a decoder
    images = (decode(latents) if decode is not None else latent_preview(latents, sfd_spec(cfg).texture_chans)).cpu()
    nrow = min(classes, n) if classes <= 16 else 8
    return save_image_grid(images, path, nrow=nrow, scale=max(1, 64 // images.shape[1]))


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


def sampling_device(cfg: Config) -> torch.device:
    """Where sampling runs: ``train.device`` resolved (``auto``: the GPU when one is visible)."""
    from ..device import resolve_device

    try:
        return resolve_device(cfg.train.device)
    except ValueError as err:
        raise ConfigError(str(err)) from None


class SamplingModel(NamedTuple):
    model: torch.nn.Module              # eval mode, EMA weights, on the CPU
    cfg: Config
    latent_stats: Optional[LatentStats]  # the checkpoint's stored latent normalisation (None: not stored)


def resolve_checkpoint(checkpoint) -> Path:
    """The checkpoint a sampling tool reads: a run directory (``train.output_dir``, holding ``checkpoints/``) stands
    for its newest verified checkpoint (the final one of a finished run); anything else is taken as given."""
    from .. import checkpoint_store as store

    path = Path(checkpoint)
    if path.is_dir() and (path / "checkpoints").is_dir():
        newest = store.latest(path)
        if newest is None:
            raise MissingInputError(f"{path / 'checkpoints'} holds no verified checkpoint")
        return newest
    return path


def load_sampling_model(checkpoint, config_files: Sequence[str] = (), overrides: Sequence[str] = ()) -> SamplingModel:
    """(eval-mode model with the EMA weights, config, stored latent statistics) from an sfd_scale checkpoint
    directory or run directory (``resolve_checkpoint``; its own config <- each of ``config_files`` <-
    ``overrides``) or an official .pt / .safetensors (``config_files`` required: schema defaults <- files <-
    overrides). Validated for sampling: no ``data.path`` needed."""
    from ..config import config_from_dict, load_config, model_args
    from ..models.lightningdit import LightningDiT
    from ..models.official import load_official_state_dict, read_checkpoint
    from .. import checkpoint_store as store

    path = resolve_checkpoint(checkpoint)
    if not path.exists():
        raise MissingInputError(f"checkpoint not found: {path}")
    stats = None
    if path.is_dir():
        cfg = config_from_dict(store.read_object(path, "config"), overrides, files=config_files, for_training=False)
        weights = store.read_weights(path, "ema")
        if LATENT_STATS in store.stored_keys(path):  # checkpoints saved before the statistics were stored lack it
            stats = LatentStats.from_object(store.read_object(path, LATENT_STATS))
    else:
        if not config_files:
            raise ConfigError(f"{path} is not an sfd_scale checkpoint directory: give --config for its model")
        cfg, weights = load_config(config_files, overrides, for_training=False), read_checkpoint(path, which="ema")
    model = LightningDiT(model_args(cfg))
    load_official_state_dict(model, weights)
    return SamplingModel(model.eval(), cfg, stats)


@dataclass
class SamplingRun:
    """Everything a sampling tool needs, on the sampling device: the model (and the autoguidance guide) moved
    there, and the run's decoder (None: no ``sample.texture_vae`` on latent data; show ``latent_preview``)."""
    model: torch.nn.Module
    cfg: Config
    device: torch.device
    guide: Optional[torch.nn.Module]
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]]
    num_classes: Optional[int]          # the data's classes where it knows them (demo); None: the model's


def prepare_sampling(checkpoint, config_files: Sequence[str] = (), overrides: Sequence[str] = ()) -> SamplingRun:
    """``load_sampling_model``, then the model and guide on ``sampling_device`` and the run's decoder
    (``data.sources.sampling_decoder``: it decodes on the device of the latents it gets)."""
    from ..data.sources import sampling_decoder

    model, cfg, stats = load_sampling_model(checkpoint, config_files, overrides)
    device = sampling_device(cfg)
    guide = load_guide(cfg, device) if cfg.sample.guidance == "autoguidance" else None
    decode, num_classes = sampling_decoder(cfg, stats)
    return SamplingRun(model.to(device), cfg, device, guide, decode, num_classes)
