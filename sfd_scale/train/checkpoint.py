"""Checkpoints: one directory per step, written atomically, verified by a manifest before use.

Layout: ``<output_dir>/checkpoints/step_0001000/{checkpoint.pt, manifest.json}``. ``checkpoint.pt`` is
an official-compatible container: ``model`` and ``ema`` state dicts under the official key names
(the official ``inference.py`` can read our ``ema``), ``opt`` (AdamW state), ``config`` (a plain dict,
so it loads under ``torch.load(weights_only=True)``), plus our ``trainer`` state (step, scheduler).
A directory only counts once its manifest (size + sha256 of the payload) verifies.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

PAYLOAD = "checkpoint.pt"
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:07d}"


def save(output_dir: str | os.PathLike, step: int, state: dict) -> Path:
    """Write ``state`` for ``step``; the final directory appears only when complete."""
    final = checkpoint_dir(output_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_step_{step:07d}_", dir=final.parent))
    try:
        torch.save(state, tmp / PAYLOAD)
        manifest = {"step": step, "file": PAYLOAD, "bytes": (tmp / PAYLOAD).stat().st_size,
                    "sha256": _sha256(tmp / PAYLOAD)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify(directory: Path) -> bool:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        payload = directory / manifest["file"]
        return payload.stat().st_size == manifest["bytes"] and _sha256(payload) == manifest["sha256"]
    except (OSError, ValueError, KeyError):
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


def load(directory: Path) -> dict:
    if not verify(directory):
        raise ValueError(f"checkpoint {directory} fails its manifest check (incomplete or corrupt)")
    return torch.load(directory / PAYLOAD, map_location="cpu", weights_only=True)
