"""Semantic VAE (SemVAE) of SFD: compresses DINOv2 patch features into a 16-channel semantic latent.

Input: the final-layer normalised patch tokens of DINOv2 ViT-B/14 with registers (CLS and register tokens
dropped) arranged as a feature map ``(B, 768, 16, 16)`` for a 224x224 image. Only the channels shrink: the
16x16 token grid is kept, so the semantic latent is ``(B, 16, 16, 16)`` and lines up with the texture latent.

encoder: Linear(768 -> width) -> depth x pre-LN Transformer block -> LayerNorm -> Linear(width -> 2 C_s)
         = [mean, log-variance] per token (diagonal Gaussian posterior)
decoder: Linear(C_s -> width)  -> depth x pre-LN Transformer block -> LayerNorm -> Linear(width -> 768)

The blocks are timm ViT blocks (GELU MLP, qkv bias) without positional embedding. At width 768, depth 4
each half has ~29M parameters.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import Block
from torch import nn

from ..atomic import atomic_path
from ..errors import UserError
from .settings import SemVAEArgs

ARGS_KEY = "semvae_args"           # safetensors metadata key holding SemVAEArgs as JSON
FORMAT_KEY = "format"
FORMAT = "sfd_scale.semvae/1"


class SemVAECheckpointError(UserError, RuntimeError):
    """A SemVAE checkpoint that cannot be used; the message names the file and the offending key(s)."""


class _TokenTransformer(nn.Module):
    """Linear(in -> width) -> blocks -> LayerNorm -> Linear(width -> out), applied per token (B, N, C)."""

    def __init__(self, in_dim: int, out_dim: int, args: SemVAEArgs):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, args.width)
        self.blocks = nn.ModuleList(
            Block(args.width, args.num_heads, mlp_ratio=args.mlp_ratio, qkv_bias=True) for _ in range(args.depth))
        self.norm = nn.LayerNorm(args.width, eps=1e-6)
        self.proj_out = nn.Linear(args.width, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(tokens)
        for block in self.blocks:
            x = block(x)
        return self.proj_out(self.norm(x))


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) map, got shape {tuple(x.shape)}")
    return x.flatten(2).transpose(1, 2)


def _to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


class SemanticVAE(nn.Module):
    def __init__(self, args: Optional[SemVAEArgs] = None):
        super().__init__()
        self.args = args = args or SemVAEArgs()
        if args.width % args.num_heads:
            raise ValueError(f"width ({args.width}) must be divisible by num_heads ({args.num_heads})")
        self.encoder = _TokenTransformer(args.feature_dim, 2 * args.latent_channels, args)
        self.decoder = _TokenTransformer(args.latent_channels, args.feature_dim, args)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):  # ViT/MAE-style init: xavier weights, zero biases
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def encode(self, features: torch.Tensor) -> DiagonalGaussianDistribution:
        """(B, feature_dim, H, W) features -> posterior over (B, C_s, H, W) (log-variance clamped to [-30, 20])."""
        if features.shape[1] != self.args.feature_dim:
            raise ValueError(f"expected {self.args.feature_dim} feature channels on dim 1, got shape "
                             f"{tuple(features.shape)}")
        h, w = features.shape[-2:]
        params = _to_map(self.encoder(_to_tokens(features)), h, w)  # (B, 2 C_s, H, W) = [mean, logvar]
        return DiagonalGaussianDistribution(params)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C_s, H, W) latent -> (B, feature_dim, H, W) reconstructed features."""
        h, w = latent.shape[-2:]
        return _to_map(self.decoder(_to_tokens(latent)), h, w)

    def forward(self, features: torch.Tensor, sample_posterior: bool = True,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(features)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_latent(self, features: torch.Tensor, sample: bool = False,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The semantic latent (B, C_s, H, W) stored by latent extraction.

        Returns the posterior MEAN unless ``sample=True``. With the paper's KL weight (1e-7) the posterior
        variance is tiny, so the mean loses nothing the diffusion model could use, and a deterministic latent
        makes extraction reproducible and resumable (a re-run or a resumed job writes identical shards).
        ``sample=True`` draws ``mean + std * eps`` with ``generator``. Gradients follow the caller's mode
        (wrap in ``torch.inference_mode()`` for extraction).
        """
        posterior = self.encode(features)
        return posterior.sample(generator) if sample else posterior.mean


def feature_cosine(features: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of cos(f_hat, f) over the feature dim (dim 1): the reconstruction-quality metric."""
    return F.cosine_similarity(reconstruction.float(), features.float(), dim=1).mean()


def semvae_loss(features: torch.Tensor, reconstruction: torch.Tensor, posterior: DiagonalGaussianDistribution,
                kl_weight: float = 1e-7) -> Dict[str, torch.Tensor]:
    """SemVAE objective (all terms in fp32), returned as scalars ``total, mse, cos, kl``:

    mse   = mean over (b, c, h, w) of (f_hat - f)^2
    cos   = mean over tokens (b, h, w) of 1 - <f_hat, f> / (|f_hat| |f|)   (over the feature dim)
    kl    = mean over b of 0.5 * sum over (c, h, w) of (mu^2 + sigma^2 - 1 - log sigma^2)   [KL(q || N(0, I))]
    total = mse + cos + kl_weight * kl
    """
    f, f_hat = features.float(), reconstruction.float()
    mse = (f_hat - f).pow(2).mean()
    cos = (1.0 - F.cosine_similarity(f_hat, f, dim=1)).mean()
    mu, logvar = posterior.mean.float(), posterior.logvar.float()  # logvar already clamped to [-30, 20]
    kl = (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))).mean()
    return {"total": mse + cos + kl_weight * kl, "mse": mse, "cos": cos, "kl": kl}


# ----------------------------------------------------------------------------------------------- checkpoint
def save_semvae(path: str | os.PathLike, model: SemanticVAE, args: SemVAEArgs, extra: Optional[dict] = None) -> Path:
    """One ``.safetensors`` file: the weights, ``semvae_args`` (JSON) and each ``extra`` item (JSON) as metadata.

    Written to a temporary file in the same directory and renamed over ``path``, so a crash never leaves a
    half-written checkpoint.
    """
    path = Path(path)
    extra = dict(extra or {})
    clash = {ARGS_KEY, FORMAT_KEY} & set(extra)
    if clash:
        raise ValueError(f"extra metadata may not use the reserved key(s) {sorted(clash)}")
    metadata = {FORMAT_KEY: FORMAT, ARGS_KEY: json.dumps(asdict(args), sort_keys=True)}
    metadata.update({str(k): json.dumps(v) for k, v in extra.items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # the umask's file mode (safetensors alone creates files 0600)
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _read_metadata(path: Path) -> dict:
    if not path.is_file():
        raise SemVAECheckpointError(f"SemVAE checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise SemVAECheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def semvae_metadata(path: str | os.PathLike) -> dict:
    """The ``extra`` metadata stored by ``save_semvae`` (decoded from JSON), e.g. step and metrics."""
    meta = _read_metadata(Path(path))
    return {k: json.loads(v) for k, v in meta.items() if k not in (ARGS_KEY, FORMAT_KEY)}


def load_semvae(path: str | os.PathLike, map_location="cpu") -> Tuple[SemanticVAE, SemVAEArgs]:
    """(model in eval mode on ``map_location``, args) from a ``save_semvae`` file.

    A missing file, missing ``semvae_args`` metadata, or missing / unexpected / mis-shaped tensors raise one
    ``SemVAECheckpointError`` naming the file and the key(s).
    """
    path = Path(path)
    meta = _read_metadata(path)
    if ARGS_KEY not in meta:
        raise SemVAECheckpointError(f"{path}: metadata key {ARGS_KEY!r} missing (not a SemVAE checkpoint?)")
    try:
        raw = json.loads(meta[ARGS_KEY])
        known = {f.name for f in fields(SemVAEArgs)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}")
        args = SemVAEArgs(**raw)
        model = SemanticVAE(args)
    except (ValueError, TypeError) as err:
        raise SemVAECheckpointError(f"{path}: bad metadata {ARGS_KEY!r}: {err}") from None
    tensors = load_file(str(path), device="cpu")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                        if k in tensors and tensors[k].shape != v.shape)
    problems = [f"{name}: {', '.join(keys)}" for name, keys in
                (("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatch", mismatched))
                if keys]
    if problems:
        raise SemVAECheckpointError(f"{path}: checkpoint does not match SemVAE {args}: " + "; ".join(problems))
    model.load_state_dict(tensors, strict=True)
    return model.to(map_location).eval(), args
