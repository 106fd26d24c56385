"""The one device resolver: a config's device name ('auto', 'cpu', 'cuda', 'cuda:1', 'meta') -> torch.device.

'auto' is CUDA when a GPU is visible, else the CPU. A bare 'cuda' means this process's GPU: ``LOCAL_RANK``
(set by torchrun and by ``parallel/launch.py`` under srun) modulo the visible GPUs, made the current device,
so every rank of a node takes its own GPU. Asking for CUDA without a GPU is a configuration error naming
the key it came from.

``peak_tflops``: a GPU's dense peak for the precision a run trains in, the MFU denominator of the training
logs and the benchmarks (``PEAK_TFLOPS``; unknown devices and CPUs have none: no MFU is reported).
"""
from __future__ import annotations

import os
from typing import Optional

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


# Dense (no structured sparsity) peak TFLOP/s of one GPU, from NVIDIA's data sheets:
# (name part, bf16 tensor core, tf32 tensor core, fp32 without tensor cores). The first entry whose name part
# occurs in ``torch.cuda.get_device_name`` wins, so the PCIe / NVL variants come before their SXM entry
# ("NVIDIA H100 80GB HBM3" is the SXM part). The H800 / A800 are the export parts of the same chips.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0, 51.2), ("H100 NVL", 835.0, 418.0, 60.0), ("H100", 989.0, 495.0, 67.0),
    ("H200 NVL", 835.0, 418.0, 60.0), ("H200", 989.0, 495.0, 67.0), ("H800", 989.0, 495.0, 67.0),
    ("A100", 312.0, 156.0, 19.5), ("A800", 312.0, 156.0, 19.5), ("L40S", 362.0, 183.0, 91.6),
)


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """Dense peak TFLOP/s of the GPU named ``device_name`` for ``precision`` ('bf16' or 'fp32'; fp32 matmuls run
    on TF32 tensor cores when torch allows it, ``torch.set_float32_matmul_precision``), None when unknown."""
    row = next((r for r in PEAK_TFLOPS if r[0] in device_name), None)
    if row is None:
        return None
    if precision == "bf16":
        return row[1]
    return row[2] if torch.get_float32_matmul_precision() != "highest" else row[3]


def device_peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    """``peak_tflops`` of this process's ``device``: None on CPU / meta and for GPUs not in the table."""
    return peak_tflops(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else None
