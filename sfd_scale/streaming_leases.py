"""Streaming's shared memory and lock files: released on a normal exit, reclaimed after a crash.

mosaicml-streaming keeps each dataset's state in POSIX shared memory (``/dev/shm/NNNNNN_*``, NNNNNN = the
dataset's prefix) and file locks (``<tmp>/NNNNNN_*_filelock``). A normal exit frees the shared memory but
leaves the lock files; a killed process group (preemption, ``scancel``, OOM) leaves both, and the leaked
``locals`` segment makes the next run on that node fail ("reused local directory"). Streaming's own
``clean_stale_shared_memory`` stops at the first clean prefix, so it misses leaks behind a live one.

Every dataset sfd_scale opens therefore holds a lease: a small JSON file next to the segments
(``/dev/shm/sfd_scale_leases/``, node-local and independent of ``TMPDIR``) naming the prefix, the lock
files and the owner (pid + process start time, so a recycled pid is not mistaken for the owner).
``release`` (normal exit) deletes the lock files and the lease; ``reclaim_stale`` (run before a dataset
is opened) deletes the segments and lock files of every prefix whose leases all belong to dead processes.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import List, Optional

from .atomic import write_text

SHM_ROOT = Path("/dev/shm")


def _lease_dir() -> Path:
    return SHM_ROOT / "sfd_scale_leases" if SHM_ROOT.is_dir() else Path(tempfile.gettempdir()) / "sfd_scale_leases"


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), None if it does not exist or is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if not Path("/proc").is_dir():  # not Linux: fall back to "does the pid exist"
            try:
                os.kill(pid, 0)
                return "unknown"
            except OSError:
                return None
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie (killed, not yet reaped; common without an init that reaps) is dead
        return None
    return fields[19]


def _alive(lease: dict) -> bool:
    started = _start_time(int(lease["pid"]))
    return started is not None and (started == lease["started"] or "unknown" in (started, lease["started"]))


def _prefix_files(prefix: int, filelock_root: str) -> List[Path]:
    tag = f"{prefix:06d}_"
    files = [p for p in SHM_ROOT.glob(tag + "*")] if SHM_ROOT.is_dir() else []
    return files + [p for p in Path(filelock_root).glob(tag + "*_filelock")]


def reclaim_stale() -> List[str]:
    """Delete what dead owners left behind; returns the deleted paths (for the log)."""
    leases = []
    for path in sorted(_lease_dir().glob("*.json")) if _lease_dir().is_dir() else []:
        try:
            leases.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue  # being written right now, or already gone
    live = {lease["prefix"] for _, lease in leases if _alive(lease)}
    removed = []
    for path, lease in leases:
        if _alive(lease):
            continue
        if lease["prefix"] not in live:
            for f in _prefix_files(lease["prefix"], lease["filelock_root"]):
                try:
                    f.unlink()
                    removed.append(str(f))
                except OSError:
                    pass
        path.unlink(missing_ok=True)
    return removed


class StreamingLease:
    """``lease = StreamingLease.acquire(); ds = StreamingDataset(...); lease.record(ds); ...; lease.release(ds)``."""

    def __init__(self):
        self.path: Optional[Path] = None
        self.reclaimed: List[str] = []

    @classmethod
    def acquire(cls) -> "StreamingLease":
        lease = cls()
        lease.reclaimed = reclaim_stale()
        return lease

    def record(self, dataset) -> None:
        prefix, root = int(dataset._shm_prefix_int), str(dataset._filelock_root)
        d = _lease_dir()
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"{prefix:06d}_{os.getpid()}.json"
        write_text(self.path, json.dumps({"prefix": prefix, "filelock_root": root, "pid": os.getpid(),
                                          "started": _start_time(os.getpid()) or "unknown"}))

    def release(self, dataset) -> None:
        """Normal exit: streaming frees its segments when the dataset goes; the lock files are ours to delete, by
        the last local user of the prefix. Our lease goes first, then the others are looked at: of ranks
        releasing at once, the one that looks last finds no lease left and deletes the lock files (looking
        first and deleting after let each see the other's lease, and the lock files stayed)."""
        prefix, root = int(dataset._shm_prefix_int), str(dataset._filelock_root)
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        others_alive = False
        for path in _lease_dir().glob(f"{prefix:06d}_*.json") if _lease_dir().is_dir() else []:
            try:
                others_alive |= _alive(json.loads(path.read_text()))
            except (OSError, ValueError):
                pass
        if not others_alive:  # the last local user of this prefix
            for f in Path(root).glob(f"{prefix:06d}_*_filelock"):
                f.unlink(missing_ok=True)
