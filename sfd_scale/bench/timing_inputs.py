"""What both step timers share (``benchmark.py`` times our layouts, ``official_step.py`` the official step):
the synthetic training batch they feed and the device sync that ends a timed step."""
from __future__ import annotations

import torch

from ..config import Config, model_args


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; CPU work is done when it returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(cfg: Config, per_rank: int) -> dict:
    """Random training inputs of the model's shapes (what the loader would hand this rank)."""
    a = model_args(cfg)
    g = torch.Generator().manual_seed(0)
    batch = {"latent": torch.randn(per_rank, a.in_channels, a.input_size, a.input_size, generator=g),
             "label": torch.randint(0, a.num_classes, (per_rank,), generator=g),
             "index": torch.arange(per_rank)}
    if a.use_repa:
        batch["repa"] = torch.randn(per_rank, a.grid ** 2, a.repa_feature_dim, generator=g)
    return batch
