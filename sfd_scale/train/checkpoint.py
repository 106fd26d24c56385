"""What the trainer puts in a checkpoint (the directory itself, DCP, manifest and pruning:
``sfd_scale/checkpoint_store.py``). Keys (layout-free: any TP x PP x DP, any engine, resumes from it):

  ``model/<official key>``, ``ema/<official key>``   full tensors under the official LightningDiT names;
  ``optim/<kind>/<official key>``                    Adam ``exp_avg`` / ``exp_avg_sq`` (+ fp32 ``master``
                                                     with bf16 weights), one full tensor per parameter;
  ``counters``                                       optimizer steps, LR schedule, engine counters;
  ``trainer``                                        step, data position, skipped steps, layout, code version;
  ``config``                                         the resolved config (a plain dict);
  ``rng/rank_00000`` ...                             every rank's torch / numpy / python RNG states
                                                     (objects are stored packed: ``checkpoint_store.pack``).

Every rank passes the tensors it holds (a TP group's ranks hold them gathered, pipeline stages their own
blocks, DP replicas the same), so a run resumes on another layout.
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from ..checkpoint_store import code_version


def run_info(cfg, step: int, layout: dict, nonfinite_steps: int = 0, code: Optional[dict] = None) -> dict:
    """The ``trainer`` object of a checkpoint. Batch k is a pure function of (seed, k) (data/sources.py),
    so the data position is the step; seed and global batch size must match to continue."""
    return {"step": step, "nonfinite_steps": nonfinite_steps, "seed": cfg.train.seed,
            "global_batch_size": cfg.train.global_batch_size,
            "data_position": {"global_batches": step, "samples": step * cfg.train.global_batch_size},
            "layout": layout, "code": code if code is not None else code_version()}


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_key(rank: int) -> str:
    return f"rng/rank_{rank:05d}"
