"""Helpers shared by the golden parity tests: everything goes through sfd_scale's public API and is
driven by the golden set's own ``config.json``, so a golden set with another configuration (patch 2,
other channel split or dt, wo_shift, a plain LightningDiT) is checked by the same tests unchanged."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

from sfd_scale.models.official import (build_official, load_official_state_dict, read_checkpoint,
                                       sfd_spec_from_official)

FORWARD_TOL = 1e-5
SAMPLING_TOL = 1e-4
# Adaptive dopri5 amplifies a last-bit difference of the forward (another CPU's BLAS / vector width sums in
# another order: ~1e-6 on the forward) into its step-size choices: measured 0.03 on model-call times and 4e-3
# on the final latent (same number of model calls). Used only where the forward is not bitwise the golden one.
ADAPTIVE_TIMES_TOL = 5e-2
ADAPTIVE_FINAL_TOL = 1e-2


@lru_cache(maxsize=None)
def config(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "config.json").read_text())


def tensors(golden_dir: Path, name: str) -> dict:
    path = golden_dir / name
    assert path.is_file(), f"golden file missing: {path}"
    return load_file(str(path))


def build(golden_dir: Path, model: str = "main", tensor_parallel: int = 1):
    """(model in eval mode with the golden weights, SFDSpec) from the official constructor kwargs; under a
    ``tensor_parallel``-way layout (set up by the caller) each rank holds its shard."""
    entry = config(golden_dir)["models"][model]
    net = build_official(tensor_parallel=tensor_parallel, **entry["kwargs"])
    load_official_state_dict(net, read_checkpoint(golden_dir / entry["weights_file"]))
    return net.eval(), sfd_spec_from_official(**entry["kwargs"])


def model_time(spec, data: dict):
    """The ``t`` argument stored with a golden case: (t_tex, t_sem) for SFD, ``t`` for a plain model."""
    return (data["t_tex"], data["t_sem"]) if spec.is_async else data["t"]


@lru_cache(maxsize=None)
def forward_is_bitwise(golden_dir: Path) -> bool:
    """Whether this machine reproduces the golden eval forward of the main model bit for bit (the machine
    the golden set was made on does; a CPU with other vector units sums in another order)."""
    entry = config(golden_dir)["models"]["main"]
    model, spec = build(golden_dir, "main")
    g = tensors(golden_dir, entry["forward_file"])
    with torch.no_grad():
        return torch.equal(model(g["x"], model_time(spec, g), g["y"]), g["out_eval"])


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs golden {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()
