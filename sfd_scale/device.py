"""The one device resolver: a config's device name ('auto', 'cpu', 'cuda', 'cuda:1', 'meta') -> torch.device.

'auto' is CUDA when a GPU is visible, else the CPU. A bare 'cuda' means this process's GPU: ``LOCAL_RANK``
(set by torchrun and by ``parallel/launch.py`` under srun) modulo the visible GPUs, made the current device,
so every rank of a node takes its own GPU. Asking for CUDA without a GPU is a configuration error naming
the key it came from.
"""
from __future__ import annotations

import os

import torch


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``name`` as a device for this process; ``key`` names the setting in the error message."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{key} is {name!r} but no GPU is available (use {key}=cpu or auto)")
    if name == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)
