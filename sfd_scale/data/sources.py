"""Training data for the trainer: which latents, in what order, and how to look at samples.

The order of samples (and each sample's flip) is a pure function of (seed, epoch, position), kept by
``ResumableBatchSampler``; a restart that restores its two counters sees exactly the same batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import Dataset

from .demo import build_demo_latents
from .official import OfficialLatentDataset


@dataclass
class TrainingData:
    dataset: Dataset                   # __getitem__((index, flip)) -> (latent, label[, repa_features])
    channels: int
    num_classes: Optional[int]
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]]  # latents -> uint8 (B, H, W, C) images
    description: str
    has_repa_features: bool = False


class _IndexFlipView(Dataset):
    """Reads sample ``index`` with the flip chosen by the sampler (not by a hidden RNG)."""

    def __init__(self, read: Callable, length: int):
        self._read, self._len = read, length

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key: Tuple[int, bool]):
        index, flip = key
        return self._read(index, flip)


def build_training_data(cfg) -> TrainingData:
    """Dataset named by ``cfg.data`` (official latent shards or the built-in digits demo)."""
    d = cfg.data
    if d.source == "demo":
        demo = build_demo_latents(seed=cfg.train.seed, semantic_chans=cfg.sfd.semantic_chans,
                                  num_samples=d.demo_samples)
        view = _IndexFlipView(lambda i, flip: (demo.latents[i], demo.labels[i]), len(demo))
        return TrainingData(view, demo.latents.shape[1], demo.num_classes, demo.decode,
                            f"scikit-learn digits: {len(demo)} images 16x16 -> latents {tuple(demo.latents.shape[1:])}")
    ds = OfficialLatentDataset(d.path, latent_norm=d.latent_norm, latent_sv_norm=d.latent_sv_norm,
                               latent_multiplier=d.latent_multiplier)
    sample = ds.read(0, False)
    view = _IndexFlipView(ds.read, len(ds))
    return TrainingData(view, sample[0].shape[0], None, None,
                        f"official latent shards at {d.path}: {len(ds)} samples, latents {tuple(sample[0].shape)}",
                        has_repa_features=len(sample) == 3)


class ResumableBatchSampler:
    """Endless batches of (index, flip): a fresh permutation per epoch from (seed, epoch).

    Batch k is a pure function of (seed, k), so resuming needs no sampler state: start at the number of
    batches already consumed (the training step). DataLoader prefetching therefore cannot skew a resume.
    Batches never straddle epochs (each epoch's tail is dropped). With several data-parallel ranks each
    rank gets its contiguous share of the same global batch.
    """

    def __init__(self, length: int, batch_size: int, seed: int, hflip: bool, start_batch: int = 0,
                 dp_rank: int = 0, dp_size: int = 1):
        if batch_size > length:
            raise ValueError(f"train.global_batch_size ({batch_size}) exceeds the dataset size ({length})")
        if batch_size % dp_size:
            raise ValueError(f"train.global_batch_size ({batch_size}) is not divisible by the data-parallel size "
                             f"({dp_size})")
        self.length, self.batch_size, self.seed, self.hflip = length, batch_size, seed, hflip
        self.batches_per_epoch = length // batch_size
        self.start_batch = start_batch
        per_rank = batch_size // dp_size  # each data-parallel rank reads its contiguous share
        self.share = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)

    def epoch_order(self, epoch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.length, generator=g)
        flips = torch.rand(self.length, generator=g) < 0.5
        return order, flips & self.hflip

    def __iter__(self) -> Iterator[List[Tuple[int, bool]]]:
        epoch, batch = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            order, flips = self.epoch_order(epoch)
            for b in range(batch, self.batches_per_epoch):
                sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
                yield list(zip(order[sl].tolist(), flips[sl].tolist()))[self.share]
            epoch, batch = epoch + 1, 0
