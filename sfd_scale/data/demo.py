"""Data side of the tiny end-to-end CPU demo: real digits, fixed texture/semantic encoders, PNG grids.

The demo must train a small SFD model on 2 CPU cores in minutes, offline, so everything here is
fixed (no learned weights) and tiny:

* Images: scikit-learn's ``load_digits`` (1797 8x8 digits, 10 classes). They ship inside the
  installed scikit-learn package, so nothing is downloaded. Upsampled to 16x16, scaled to [-1, 1].
* Texture latent (stand-in for the SD-VAE): ``PixelTextureCodec``, a pixel-unshuffle by 2. It is
  exactly invertible, so sample quality is limited only by the diffusion model, never the "VAE".
* Semantic latent (stand-in for the Semantic VAE on DINOv2 features): ``PatchPCASemanticEncoder``,
  a PCA of a neighbourhood wider than the texture cell, fitted once in closed form. Its leading
  components are smooth, low-frequency structure (where the strokes are), which is the role the
  semantic channels play in SFD: coarse layout first, texture later.

``build_demo_latents`` ties them together into normalised composite latents
``concat[texture (4), semantic (2)]`` of shape (N, 6, 8, 8), texture channels first.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_path

__all__ = [
    "load_digit_images", "PixelTextureCodec", "PatchPCASemanticEncoder", "DemoLatents",
    "DemoLatentDataset", "build_demo_latents", "images_to_uint8", "save_image_grid",
]


def load_digit_images(size: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits as ``(images (N,1,size,size) float32 in [-1,1], labels (N,) int64)``.

    Bilinear (not bicubic) upsampling: it is a convex combination of pixels, so values stay inside
    [-1, 1] and the exact-round-trip guarantees downstream need no extra clamping.
    """
    from sklearn.datasets import load_digits  # local import: only the demo needs scikit-learn

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1) / 16.0 * 2.0 - 1.0  # 0..16 -> [-1,1]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp_(-1.0, 1.0).contiguous(), torch.from_numpy(digits.target.astype(np.int64))


class PixelTextureCodec:
    """Fixed, exactly invertible texture "VAE": pixel-unshuffle / pixel-shuffle by ``factor``.

    (N, C, H, W) <-> (N, C*factor**2, H/factor, W/factor); for 16x16 grey digits: (N, 4, 8, 8).
    """

    def __init__(self, factor: int = 2):
        self.factor = int(factor)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images.float(), self.factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # Clamp: sampled latents can leave the data range; the images' range is [-1, 1].
        return F.pixel_shuffle(latents.float(), self.factor).clamp(-1.0, 1.0)


class PatchPCASemanticEncoder:
    """Fixed semantic encoder: PCA of the ``window`` x ``window`` pixel neighbourhood of each latent cell.

    The window (default 6x6, stride 2 = the texture codec's factor) is wider than the 2x2 cell a
    texture latent sees, and only the top ``channels`` principal components are kept, so the result is
    a coarse, smooth description of local structure (ink mass, stroke direction). Borders use
    replicate padding: digit borders are background, so this does not invent strokes.

    The fitted state is a plain dict of tensors (``components`` (C, D), ``mean`` (D,)) so it can be
    stored in a checkpoint next to the model.
    """

    def __init__(self, channels: int = 2, window: int = 6, stride: int = 2):
        if (window - stride) % 2 or window < stride:
            raise ValueError(f"window - stride must be even and >= 0, got window={window}, stride={stride}")
        self.channels, self.window, self.stride = int(channels), int(window), int(stride)
        self.pad = (self.window - self.stride) // 2  # keeps the output grid at H/stride x W/stride
        self.components: Optional[torch.Tensor] = None
        self.mean: Optional[torch.Tensor] = None

    def _patches(self, images: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        """(N, C, H, W) -> ((N*h*w, C*window*window), h, w), rows in (n, i, j) order."""
        x = images.float()
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, mode="replicate")
        cols = F.unfold(x, kernel_size=self.window, stride=self.stride)  # (N, D, h*w)
        h = (x.shape[-2] - self.window) // self.stride + 1
        w = (x.shape[-1] - self.window) // self.stride + 1
        return cols.transpose(1, 2).reshape(-1, cols.shape[1]), h, w

    def fit(self, images: torch.Tensor) -> "PatchPCASemanticEncoder":
        """Fit the PCA once on training images (deterministic: full SVD, ``random_state=0``)."""
        from sklearn.decomposition import PCA

        patches, _, _ = self._patches(images)
        # float64 + full SVD: the result (signs included, via sklearn's svd_flip) does not depend on
        # threads or randomised solvers, so two builds give bit-identical encoders.
        pca = PCA(n_components=self.channels, svd_solver="full", random_state=0)
        pca.fit(patches.double().numpy())
        self.components = torch.from_numpy(pca.components_.astype(np.float32))
        self.mean = torch.from_numpy(pca.mean_.astype(np.float32))
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images in [-1, 1] -> (N, channels, H/stride, W/stride) semantic latents."""
        if self.components is None:
            raise RuntimeError("PatchPCASemanticEncoder.encode called before fit() / load_state_dict()")
        patches, h, w = self._patches(images)
        z = (patches - self.mean) @ self.components.T  # (N*h*w, channels)
        return z.reshape(images.shape[0], h, w, self.channels).permute(0, 3, 1, 2).contiguous()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        if self.components is None:
            raise RuntimeError("PatchPCASemanticEncoder is not fitted")
        return {"components": self.components.clone(), "mean": self.mean.clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> "PatchPCASemanticEncoder":
        comps, mean = state["components"].float(), state["mean"].float()
        if comps.ndim != 2 or comps.shape[0] != self.channels or mean.shape != (comps.shape[1],):
            raise ValueError(f"bad semantic encoder state: components {tuple(comps.shape)}, mean {tuple(mean.shape)}, "
                             f"expected ({self.channels}, D) and (D,)")
        if comps.shape[1] % (self.window * self.window):
            raise ValueError(f"components dim {comps.shape[1]} does not match window {self.window}")
        self.components, self.mean = comps.clone(), mean.clone()
        return self


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8 (the layout ``save_image_grid`` takes)."""
    x = ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


@dataclass
class DemoLatents:
    """Normalised composite latents of the digits plus everything needed to undo them.

    ``latents`` (N, 6, 8, 8) = concat[texture, semantic], each channel normalised with ``mean`` /
    ``std`` (shape (6,), over samples and spatial dims) so the diffusion model sees unit-scale data
    in every channel, as SFD does with its per-channel latent statistics.
    """

    latents: torch.Tensor
    labels: torch.Tensor
    images: torch.Tensor  # (N, 1, 16, 16) float in [-1, 1]: the source of the latents, for checks / FID-like evals
    mean: torch.Tensor
    std: torch.Tensor
    texture_codec: PixelTextureCodec
    semantic_encoder: PatchPCASemanticEncoder
    texture_chans: int = 4
    semantic_chans: int = 2
    num_classes: int = 10

    def __len__(self) -> int:
        return self.latents.shape[0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 16, 16) in [-1, 1] -> normalised composite latents (B, 6, 8, 8)."""
        raw = torch.cat([self.texture_codec.encode(images), self.semantic_encoder.encode(images)], dim=1)
        return (raw - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Composite latents (B, 6, 8, 8) -> uint8 images (B, 16, 16, 1). Semantic channels are dropped."""
        c = self.texture_chans
        tex = latents[:, :c].float().cpu() * self.std[:c].view(1, -1, 1, 1) + self.mean[:c].view(1, -1, 1, 1)
        return images_to_uint8(self.texture_codec.decode(tex))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Plain tensors (normalisation stats + semantic PCA) to keep with a checkpoint."""
        sem = {f"semantic.{k}": v for k, v in self.semantic_encoder.state_dict().items()}
        return {"mean": self.mean.clone(), "std": self.std.clone(), **sem}

    def dataset(self, hflip: bool = False) -> "DemoLatentDataset":
        return DemoLatentDataset(self, hflip=hflip)


class DemoLatentDataset(torch.utils.data.Dataset):
    """``(latent (6, 8, 8) float32, label int64)`` pairs.

    ``hflip`` (off by default: digits are not mirror-symmetric, a flipped 2 is not a 2) flips in
    *image* space and re-encodes, because neither latent is flip-equivariant channel-wise (the
    unshuffle's sub-pixel channels swap, and the PCA patches change). Flipped latents are
    precomputed once; the per-item coin uses the global torch RNG so the trainer's seed governs it.
    """

    def __init__(self, data: DemoLatents, hflip: bool = False):
        self.latents, self.labels, self.hflip = data.latents, data.labels, bool(hflip)
        self.flipped = data.encode(data.images.flip(-1)) if self.hflip else None

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.hflip and bool(torch.rand(()) < 0.5):
            return self.flipped[idx], self.labels[idx]
        return self.latents[idx], self.labels[idx]


def build_demo_latents(seed: int = 0, semantic_chans: int = 2, window: int = 6,
                       num_samples: Optional[int] = None) -> DemoLatents:
    """Load the digits, fit the semantic PCA on them and return normalised composite latents.

    ``seed`` fixes the (shuffled) sample order and, with ``num_samples``, which subset is kept;
    the encoders themselves have no randomness, so equal arguments give identical results.
    """
    images, labels = load_digit_images(16)
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(images.shape[0], generator=g)
    if num_samples is not None:
        order = order[: int(num_samples)]
    images, labels = images[order].contiguous(), labels[order].contiguous()

    tex_codec = PixelTextureCodec(2)
    sem_enc = PatchPCASemanticEncoder(channels=semantic_chans, window=window, stride=2).fit(images)
    raw = torch.cat([tex_codec.encode(images), sem_enc.encode(images)], dim=1)
    # Per-channel stats in float64 so they do not depend on summation order at this size.
    mean = raw.double().mean(dim=(0, 2, 3))
    std = raw.double().std(dim=(0, 2, 3)).clamp_min(1e-6)
    latents = ((raw.double() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).float().contiguous()
    return DemoLatents(latents=latents, labels=labels, images=images, mean=mean.float(), std=std.float(),
                       texture_codec=tex_codec, semantic_encoder=sem_enc, texture_chans=tex_codec.factor ** 2,
                       semantic_chans=int(semantic_chans), num_classes=10)


def save_image_grid(images: Union[torch.Tensor, np.ndarray], path: Union[str, os.PathLike], nrow: int = 8,
                    scale: int = 4, padding: int = 1, pad_value: int = 128) -> str:
    """Write uint8 images (B, H, W, C in {1, 3}) as one PNG grid; returns the path.

    ``nrow`` images per row. ``padding`` grey pixels (before scaling) separate tiles and frame the
    grid; the whole grid is then upscaled ``scale`` x with nearest neighbour so 16x16 digits stay
    crisp. Output size: width = (ncol*(W+padding)+padding)*scale, height = (nrows*(H+padding)+padding)*scale.
    Written atomically (``sfd_scale/atomic.py``), so readers never see half a PNG.
    """
    from PIL import Image

    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3) or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (B, H, W, 1|3), got {arr.dtype} {arr.shape}")
    b, h, w, c = arr.shape
    ncol = max(1, min(int(nrow), b))
    nrows = -(-b // ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    for k in range(b):
        r, q = divmod(k, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y:y + h, x:x + w] = arr[k]
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    img = Image.fromarray(np.ascontiguousarray(grid[..., 0] if c == 1 else grid))  # uint8 2-D -> "L", HxWx3 -> "RGB"

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
