"""The three frozen encoders of SFD latent extraction: texture VAE, DINOv2 ViT-B/14-reg4 and the Semantic VAE.

* ``TextureVAE``: the LDM AutoencoderKL of the f16d32 tokenizer (``ldm-imagenet256-f16d32-50ep.ckpt``), built
  with ``diffusers.AutoencoderKL``. LDM's ``attn_resolutions=[16]`` at ``resolution=256`` puts one attention
  block after every ResNet block of the lowest-resolution level (16x16) of the encoder and of the decoder, in
  addition to the mid block. diffusers expresses this exactly: ``AttnDownEncoderBlock2D`` as the last down block
  and ``AttnUpDecoderBlock2D`` as the first up block (same resnet -> attention order, single-head attention with
  GroupNorm(32, eps 1e-6) and 1/sqrt(C) scaling, as LDM's ``AttnBlock``).
* ``DinoEncoder``: timm ``vit_base_patch14_reg4_dinov2`` (``dynamic_img_size``, so the 37x37 position embedding
  of the released weights is resampled per input size with antialiased bicubic, as the torch-hub model does).
* ``SemanticEncoder``: ``sfd_scale.semvae.model.SemanticVAE`` (posterior mean of the semantic latent).

Weights come from user-given paths only. Every loader raises ``FileNotFoundError`` naming a missing path and one
``WeightsError`` (a ``ValueError``) naming the file and the first offending keys when tensors are missing,
unexpected or mis-shaped.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MissingInputError, UserError
from ..semvae.model import SemanticVAE, SemVAEArgs, load_semvae

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DINO_MODEL = "vit_base_patch14_reg4_dinov2"
# Training-only parts of LDM / VA-VAE checkpoints (LPIPS + discriminator, VF-loss projection, EMA shadow).
LDM_IGNORED_PREFIXES = ("loss.", "linear_proj.", "model_ema.", "foundation_model.")
_SHOW = 6  # offending keys listed per kind in an error message


class WeightsError(UserError, ValueError):
    """Weights that do not fit the model; the message names the file and the first offending keys."""


# ----------------------------------------------------------------------------------------------- weights I/O
def _need_file(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{what} weights not found: {path}")
    return path


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch checkpoint (``state_dict`` / ``model`` entry or a bare dict).

    Lightning ``.ckpt`` files may pickle non-tensor objects: when the safe loader refuses them we fall back to
    ``weights_only=False``, so only pass checkpoints you trust."""
    path = _need_file(path, "checkpoint")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickled Lightning/OmegaConf objects next to the weights
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise WeightsError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {err})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def check_and_load(model: nn.Module, sd: Dict[str, torch.Tensor], path,
                   name: Optional[Callable[[str], str]] = None, unexpected: Sequence[str] = ()) -> None:
    """Strict ``load_state_dict`` with one readable error. ``name`` gives the checkpoint's own name of a model
    key (shown next to it); ``unexpected`` lists checkpoint keys a converter could not place."""
    expected = model.state_dict()
    label = (lambda k: f"{k} (checkpoint: {name(k)})" if name else k)
    missing = [label(k) for k in expected if k not in sd]
    extra = list(unexpected) + [k for k in sd if k not in expected]
    shapes = [f"{label(k)} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and sd[k].shape != v.shape]
    problems = [f"{n} {len(keys)}: {', '.join(keys[:_SHOW])}{', ...' if len(keys) > _SHOW else ''}"
                for n, keys in (("missing", missing), ("unexpected", extra), ("mis-shaped", shapes)) if keys]
    if problems:
        raise WeightsError(f"{path}: weights do not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------------------------- texture VAE
def texture_vae_config(block_out_channels=(128, 128, 256, 256, 512), layers_per_block: int = 2,
                       latent_channels: int = 32, norm_num_groups: int = 32, sample_size: int = 256) -> dict:
    """diffusers ``AutoencoderKL`` config of LDM's KL autoencoder (defaults: f16d32, ch 128, ch_mult 1,1,2,2,4)
    with attention at the lowest-resolution level (``attn_resolutions=[resolution / 2**(levels-1)]``)."""
    n = len(block_out_channels)
    return dict(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=layers_per_block,
                block_out_channels=tuple(block_out_channels), norm_num_groups=norm_num_groups,
                sample_size=sample_size, act_fn="silu",
                down_block_types=("DownEncoderBlock2D",) * (n - 1) + ("AttnDownEncoderBlock2D",),
                up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (n - 1))


TINY_TEXTURE = dict(block_out_channels=(8, 8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)


def _ldm_name(key: str, levels: int) -> str:
    """The LDM name of a diffusers AutoencoderKL key (for error messages only)."""
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.attentions\.", r"down.\1.attn.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    part = {"resnets": "block", "attentions": "attn", "upsamplers.0": "upsample"}
    key = re.sub(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers\.0)\.",
                 lambda m: f"up.{levels - 1 - int(m[1])}.{part[m[2]]}.", key)
    key = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", key)
    key = key.replace("mid_block.attentions.0", "mid.attn_1").replace("conv_norm_out", "norm_out")
    for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"),
                     ("conv_shortcut", "nin_shortcut")):
        key = key.replace(f".{new}.", f".{old}.")
    return key


def ldm_to_diffusers_vae(sd: Dict[str, torch.Tensor], config: dict):
    """(diffusers state dict, unplaced LDM keys) from an LDM-layout VAE state dict.

    diffusers' ``convert_ldm_vae_checkpoint`` maps everything except the attention blocks inside the down/up
    levels (it only knows SD's VAE, whose attention sits in the mid block alone, and passes
    ``encoder.down.{i}.attn.*`` through unrenamed). We map those with diffusers' own
    ``update_vae_attentions_ldm_to_diffusers`` (LDM up level ``b`` is diffusers up block ``levels-1-b``)."""
    from diffusers.loaders.single_file_utils import (LDM_VAE_KEYS, convert_ldm_vae_checkpoint,
                                                     update_vae_attentions_ldm_to_diffusers)
    for prefix in LDM_VAE_KEYS:  # a full LDM checkpoint: keep the first stage only
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if not k.startswith(LDM_IGNORED_PREFIXES)}
    out = convert_ldm_vae_checkpoint(sd, config)
    out = {k: v for k, v in out.items() if not re.match(r"(encoder\.down|decoder\.up)\.\d", k)}  # passed through
    levels = len(config["block_out_channels"])
    for key in sd:
        m = re.match(r"(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)\.", key)
        if m:
            i = int(m[2]) if m[1] == "encoder.down" else levels - 1 - int(m[2])
            new = f"{m[1]}_blocks.{i}.attentions.{m[3]}."
            update_vae_attentions_ldm_to_diffusers([key], out, sd, {"old": m[0], "new": new})
    used = {v.data_ptr() for v in out.values()}  # the converter renames and slices, it never copies
    unplaced = [k for k, v in sd.items() if v.data_ptr() not in used]
    return out, unplaced


class TextureVAE(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) -> texture latent (B, C, H/16, W/16): posterior ``sample`` or ``mean``."""

    def __init__(self, vae, mode: str = "sample"):
        super().__init__()
        if mode not in ("sample", "mean"):
            raise ValueError(f"texture mode must be 'sample' or 'mean', got {mode!r}")
        self.vae, self.mode = vae.eval().requires_grad_(False), mode

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @classmethod
    def build(cls, mode: str = "sample", **config) -> "TextureVAE":
        from diffusers import AutoencoderKL
        return cls(AutoencoderKL.from_config(texture_vae_config(**config)), mode)

    @classmethod
    def random_init(cls, seed: int = 0, mode: str = "sample", **config) -> "TextureVAE":
        """Randomly initialised (tiny by default) VAE for tests and demos; identical for equal arguments."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls.build(mode, **{**TINY_TEXTURE, **config})

    @classmethod
    def from_pretrained(cls, path, mode: str = "sample", **config) -> "TextureVAE":
        """An original LDM checkpoint (``.ckpt``/``.pt``/``.safetensors``; architecture from ``config``, default
        f16d32) or a diffusers-format directory (``config.json`` + ``diffusion_pytorch_model.*``)."""
        from diffusers import AutoencoderKL
        path = _need_file(path, "texture VAE")
        if path.is_dir():
            model = AutoencoderKL.from_config(AutoencoderKL.load_config(str(path)))
            files = [path / f"diffusion_pytorch_model.{ext}" for ext in ("safetensors", "bin")]
            file = next((f for f in files if f.is_file()), None)
            if file is None:
                raise MissingInputError(f"texture VAE weights not found: {files[0]} (or .bin)")
            check_and_load(model, read_state_dict(file), file)
            return cls(model, mode)
        model = AutoencoderKL.from_config(texture_vae_config(**config))
        sd, unplaced = ldm_to_diffusers_vae(read_state_dict(path), dict(model.config))
        levels = len(model.config.block_out_channels)
        check_and_load(model, sd, path, lambda k: _ldm_name(k, levels), unplaced)
        return cls(model, mode)

    def forward(self, images: torch.Tensor, generator: Generators = None, mode: Optional[str] = None) -> torch.Tensor:
        return self.encode(images, generator, mode)

    def encode(self, images: torch.Tensor, generator: Generators = None, mode: Optional[str] = None) -> torch.Tensor:
        """``generator``: one ``torch.Generator`` for the batch or a list with one per image (results then do not
        depend on how images are batched); CPU generators give the same noise on every device."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        mode = mode or self.mode
        moments = self.vae.encode(images.to(self.vae.dtype)).latent_dist.parameters
        posterior = DiagonalGaussianDistribution(moments.float())
        if mode == "mean":
            return posterior.mean
        return posterior.sample(list(generator) if isinstance(generator, (list, tuple)) else generator)


# ----------------------------------------------------------------------------------------------- DINOv2
TINY_DINO = dict(embed_dim=768, depth=1, num_heads=12)


class DinoEncoder(nn.Module):
    """DINOv2 ViT-B/14 with 4 registers: crops in [0, 1] (B, 3, H, W) -> final-layer normalised patch tokens
    (B, D, H/16, W/16).

    The whole crop (no second crop) is resized to ``14 * H/16`` (224 for 256) with antialiased bicubic
    interpolation, so token (i, j) covers the same 16x16-pixel cell as texture latent (i, j); then ImageNet
    mean/std normalisation. ``antialias=False`` gives the plain bicubic resize of some reference scripts."""

    def __init__(self, model, downsample: int = 16, antialias: bool = True):
        super().__init__()
        self.model, self.downsample, self.antialias = model.eval().requires_grad_(False), downsample, antialias
        self.patch = model.patch_embed.patch_size[0]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_dim(self) -> int:
        return self.model.embed_dim

    @staticmethod
    def build(**kwargs):
        import timm
        return timm.create_model(DINO_MODEL, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)

    @classmethod
    def random_init(cls, seed: int = 0, **kwargs) -> "DinoEncoder":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(cls.build(**{**TINY_DINO, **kwargs}))

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "DinoEncoder":
        """timm-format weights or the original facebookresearch/dinov2 hub ``.pth`` (``register_tokens``,
        ``mask_token``, cls/pos layout), converted by timm's ``checkpoint_filter_fn``."""
        from timm.models.vision_transformer import checkpoint_filter_fn
        path = _need_file(path, "DINOv2")
        if path.is_dir():
            files = [path / n for n in ("model.safetensors", "pytorch_model.bin")]
            path = next((f for f in files if f.is_file()), files[0])
            _need_file(path, "DINOv2")
        model = cls.build(**kwargs)
        check_and_load(model, checkpoint_filter_fn(read_state_dict(path), model), path)
        return cls(model)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        size = (self.patch * (h // self.downsample), self.patch * (w // self.downsample))
        x = F.interpolate(images.float(), size=size, mode="bicubic", antialias=self.antialias, align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images).to(self.model.cls_token.dtype)
        tokens = self.model.forward_features(x)[:, self.model.num_prefix_tokens:]  # drop CLS + registers
        gh, gw = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)


# ----------------------------------------------------------------------------------------------- semantic VAE
TINY_SEMVAE = dict(width=64, depth=1, num_heads=2)


class SemanticEncoder(nn.Module):
    """DINOv2 features (B, D, h, w) -> semantic latent (B, C_s, h, w), the SemVAE posterior mean."""

    def __init__(self, model: SemanticVAE):
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    @property
    def latent_channels(self) -> int:
        return self.model.args.latent_channels

    @classmethod
    def from_pretrained(cls, path) -> "SemanticEncoder":
        return cls(load_semvae(_need_file(path, "Semantic VAE"))[0])

    @classmethod
    def random_init(cls, seed: int = 0, **kwargs) -> "SemanticEncoder":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(SemanticVAE(replace(SemVAEArgs(), **{**TINY_SEMVAE, **kwargs})))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.encode_latent(features.to(self.model.encoder.proj_in.weight.dtype), sample=False)


# ----------------------------------------------------------------------------------------------- composite
class CompositeEncoder(nn.Module):
    """Texture VAE + DINOv2 + Semantic VAE: one call gives what a latent shard stores per image. Without a
    Semantic VAE (``semantic=None``: the first extraction pass, whose DINOv2 features train the Semantic VAE)
    no semantic latents are produced."""

    def __init__(self, texture: TextureVAE, dino: DinoEncoder, semantic: Optional[SemanticEncoder]):
        super().__init__()
        if semantic is not None and semantic.model.args.feature_dim != dino.feature_dim:
            raise ValueError(f"Semantic VAE expects {semantic.model.args.feature_dim}-d features, DINOv2 gives "
                             f"{dino.feature_dim}")
        self.texture, self.dino, self.semantic = texture, dino, semantic

    @classmethod
    def from_paths(cls, texture_vae, dino, semvae, device="cpu", dtype=torch.float32,
                   texture_mode: str = "sample") -> "CompositeEncoder":
        enc = cls(TextureVAE.from_pretrained(texture_vae, texture_mode), DinoEncoder.from_pretrained(dino),
                  SemanticEncoder.from_pretrained(semvae) if semvae is not None else None)
        return enc.to(device=device, dtype=dtype)

    @classmethod
    def random_init(cls, seed: int = 0, device="cpu", dtype=torch.float32, texture_mode: str = "sample",
                    texture: Optional[dict] = None, dino: Optional[dict] = None,
                    semvae: Optional[dict] = None) -> "CompositeEncoder":
        """Tiny randomly initialised encoders (same weights for the same seed and sizes in every process)."""
        tex = TextureVAE.random_init(seed, texture_mode, **(texture or {}))
        din = DinoEncoder.random_init(seed + 1, **(dino or {}))
        sem = SemanticEncoder.random_init(seed + 2, **{"feature_dim": din.feature_dim, **(semvae or {})})
        return cls(tex, din, sem).to(device=device, dtype=dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, with_features: bool = False, generator: Generators = None
               ) -> Dict[str, torch.Tensor]:
        """``images``: uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 1]. Returns float32 ``latents``
        (B, 32, H/16, W/16), ``latents_sv`` (B, 16, H/16, W/16) and, if asked, ``feats_dino`` (B, 768, ...)."""
        device = next(self.parameters()).device
        images = unit_images(images, device) if images.dtype == torch.uint8 else images.to(device=device).float()
        out = {"latents": self.texture.encode(images * 2.0 - 1.0, generator).float()}
        feats = self.dino(images)
        if self.semantic is not None:
            out["latents_sv"] = self.semantic(feats).float()
        if with_features:
            out["feats_dino"] = feats.float()
        return out


def flip_crops(crops: torch.Tensor, flips: Sequence[bool]) -> torch.Tensor:
    """uint8 (B, H, W, 3) crops, mirrored (width reversed) where ``flips`` is true: the flip of a shard sample
    (``latents_flip`` / ``feats_dino_flip``), done on the decoded crop before any encoder sees it."""
    mask = torch.as_tensor(flips, dtype=torch.bool, device=crops.device).view(-1, 1, 1, 1)
    return torch.where(mask, crops.flip(2), crops)


def unit_images(crops: torch.Tensor, device) -> torch.Tensor:
    """uint8 (B, H, W, 3) crops -> float32 (B, 3, H, W) in [0, 1] on ``device``: what every encoder is given
    (``CompositeEncoder.encode`` at extraction, ``online_repa.FrozenDino`` in training); DINOv2 resizes and
    normalises it itself (``DinoEncoder.preprocess``)."""
    return crops.to(device).permute(0, 3, 1, 2).float() / 255.0


def image_generators(seed: int, indices: Sequence[int], flip: bool) -> List[torch.Generator]:
    """One CPU generator per image, seeded from (seed, source index, flip): independent of batching, ranks and
    restarts."""
    gens = []
    for i in indices:
        state = np.random.SeedSequence([int(seed), int(i), int(flip)]).generate_state(2, np.uint32)
        gens.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens
