"""The Semantic VAE trained online from images (``data.source: images`` of ``sfd semvae``): the
paper's random-crop augmentation (Tab. 7), DINOv2 features computed per batch.

Step k's batch is a pure function of (train.seed, k), so a resumed run continues exactly (nothing to store):
the images and their flips come from ``sources.ResumableBatchSampler`` (a permutation per epoch), the crops
from ``random_crops`` (a generator keyed by (seed, step)). A crop is ADM's ``random_crop_arr`` done by DALI:
the short side resized to an integer drawn uniformly from [resolution, ceil(resolution / min_crop_frac)] with
the extraction's antialiased cubic resize, then a square crop whose corner lies at a uniform fraction of the
free range in each direction, then the mirror image for the flipped half (``images.ImageDecoder.decode_crops``).
The paper says "random crop" only; ADM's recipe (the SFD pipeline's lineage) is our reading of it.

The held-out batch is the extraction's centre crop (short side = resolution, crop in the middle, no flip) of
``eval_path``'s first ``eval_size`` images, or of the training folder's last ones. Features come from a frozen
DINOv2 (``online_repa.FrozenDino``: bf16 + compiled on CUDA, chunks of the batch size), as at extraction.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np
import torch

from ..config import ConfigError
from ..semvae.train import SemVAETrainConfig, _Source
from .encoders import CompositeEncoder, DinoEncoder
from .extract import list_inputs
from .images import ImageDecoder, read_encoded
from .online_repa import FrozenDino
from .sources import ResumableBatchSampler


def random_crops(seed: int, step: int, n: int, resolution: int, min_crop_frac: float) -> Tuple[list, list, list]:
    """(short side, corner x fraction, corner y fraction) of step ``step``'s ``n`` crops."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 6, int(step)]))
    shorter = rng.integers(resolution, math.ceil(resolution / min_crop_frac) + 1, size=n)
    x, y = rng.random(n, dtype=np.float32), rng.random(n, dtype=np.float32)
    return shorter.astype(np.float32).tolist(), x.tolist(), y.tolist()


class ImageFeatures(_Source):
    """DINOv2 features of random crops of an image folder, batch by batch."""

    def __init__(self, cfg: SemVAETrainConfig, device):
        d, t = cfg.data, cfg.train
        self.cfg, self.files = cfg, list_inputs(d.path, d.input_list).files
        self.eval_files = list_inputs(d.eval_path).files[:d.eval_size] if d.eval_path else \
            self.files[-d.eval_size:]
        if len(self.files) < t.batch_size:
            raise ConfigError(f"data.path {d.path}: {len(self.files)} images, fewer than train.batch_size "
                              f"({t.batch_size})")
        dino = CompositeEncoder.random_init(0).dino if d.dino_random_init else DinoEncoder.from_pretrained(d.dino)
        if dino.feature_dim != cfg.model.feature_dim:
            raise ConfigError(f"model.feature_dim ({cfg.model.feature_dim}) differs from the DINOv2's "
                              f"{dino.feature_dim}-d features (data.dino)")
        self.encoder = FrozenDino(dino, device, chunk=t.batch_size)
        self.decoder = ImageDecoder(device, max(d.num_workers, 1), max_batch=max(t.batch_size, d.eval_size))
        self.sampler = ResumableBatchSampler(len(self.files), t.batch_size, t.seed, d.hflip)
        self._epoch: Tuple[int, list, list] = (-1, [], [])

    def keys(self, step: int) -> List[Tuple[int, bool]]:
        """(image index, flip) of step ``step``'s samples."""
        epoch, b = divmod(step, self.sampler.batches_per_epoch)
        if self._epoch[0] != epoch:  # one permutation per epoch, kept while the epoch lasts
            order, flips = self.sampler.epoch_order(epoch)
            self._epoch = (epoch, order.tolist(), flips.tolist())
        size = self.sampler.batch_size
        sl = slice(b * size, (b + 1) * size)
        return list(zip(self._epoch[1][sl], self._epoch[2][sl]))

    def crops(self, step: int) -> torch.Tensor:
        """Step ``step``'s uint8 (B, resolution, resolution, 3) crops, on the device."""
        d, keys = self.cfg.data, self.keys(step)
        shorter, x, y = random_crops(self.cfg.train.seed, step, len(keys), d.resolution, d.min_crop_frac)
        return self.decoder.decode_crops([read_encoded(self.files[i]) for i, _ in keys], d.resolution, shorter, x, y,
                                         [flip for _, flip in keys])

    def batch(self, step: int) -> torch.Tensor:
        return self.encoder(self.crops(step)).float()

    def eval_batch(self) -> torch.Tensor:
        n, res = len(self.eval_files), self.cfg.data.resolution
        crops = self.decoder.decode_crops([read_encoded(f) for f in self.eval_files], res, [res] * n, [0.5] * n,
                                          [0.5] * n, [False] * n)
        return self.encoder(crops).float()
