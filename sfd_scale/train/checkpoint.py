"""Checkpoints: one directory per step, written atomically, verified by a manifest before use.

Layout: ``<output_dir>/checkpoints/step_0001000/``
  ``checkpoint.pt``        written by rank 0: an official-compatible container: ``model`` and ``ema`` state
                           dicts under the official key names (full tensors, gathered over TP; the official
                           ``inference.py`` can read our ``ema``), ``config`` (a plain dict, loads under
                           ``torch.load(weights_only=True)``) and ``trainer`` (step, layout);
  ``engine_rank00000.pt``  one per rank: that rank's optimizer / LR-schedule / engine state;
  ``manifest.json``        written last by rank 0: size and sha256 of every file.
The ranks write into a temporary directory that rank 0 renames once the manifest is complete, so a
directory only exists (and counts) when every rank's part is there and verifies.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

SHARED = "checkpoint.pt"
MANIFEST = "manifest.json"


def rank_file(rank: int) -> str:
    return f"engine_rank{rank:05d}.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:07d}"


def save(output_dir: str | os.PathLike, step: int, shared: Optional[dict], per_rank: dict) -> Path:
    """Collective: every rank passes its ``per_rank`` state, rank 0 also ``shared``."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    final = checkpoint_dir(output_dir, step)
    tmp = final.parent / f".tmp_{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a run killed while saving
        tmp.mkdir(parents=True)
    _barrier()
    torch.save(per_rank, tmp / rank_file(rank))
    if rank == 0:
        torch.save(shared, tmp / SHARED)
    _barrier()
    if rank == 0:
        files = [SHARED] + [rank_file(r) for r in range(world)]
        manifest = {"step": step, "world_size": world,
                    "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier()
    return final


def verify(directory: Path) -> bool:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        return all((directory / f).stat().st_size == m["bytes"] and _sha256(directory / f) == m["sha256"]
                   for f, m in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def latest(output_dir: str | os.PathLike) -> Optional[Path]:
    """Newest checkpoint directory whose manifest verifies (a torn or corrupt one is passed over)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for directory in sorted(root.glob("step_*"), reverse=True):
        if verify(directory):
            return directory
    return None


def load(directory: Path, rank: Optional[int] = None) -> dict:
    """The shared state, plus this rank's part under ``"engine"`` when ``rank`` is given."""
    if not verify(directory):
        raise ValueError(f"checkpoint {directory} fails its manifest check (incomplete or corrupt)")
    state = torch.load(directory / SHARED, map_location="cpu", weights_only=True)
    if rank is not None:
        world = json.loads((directory / MANIFEST).read_text())["world_size"]
        if not (directory / rank_file(rank)).is_file():
            raise ValueError(f"checkpoint {directory} was written by {world} ranks; rank {rank} has no state there "
                             f"(resume with the same layout)")
        state["engine"] = torch.load(directory / rank_file(rank), map_location="cpu", weights_only=True)
    return state
