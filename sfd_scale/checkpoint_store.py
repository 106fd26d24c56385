"""Checkpoint directories: sharded DCP saves written by every rank in the background, published atomically,
verified against a manifest, pruned, read back (ground floor: no sfd_scale imports, so models, eval and train
all use it).

A checkpoint is a directory ``<output_dir>/checkpoints/step_0001000/`` holding a
torch.distributed.checkpoint (DCP) save plus ``manifest.json``. What the keys mean is the writer's business
(the trainer's layout: ``train/state.py``); this module stores tensors under any keys and small objects
packed as uint8 tensors (``pack`` / ``unpack``). Every rank passes the tensors it holds; DCP writes each key
once, spreading the keys over the ranks that hold them. Loading reads only the keys a rank needs.

The save (``Checkpointer.save``) waits for the state to be copied to host memory (``StateStager``: device
tensors into pinned host buffers allocated at the first save and reused by every later one, host tensors
by DCP's plain stager; the caller passes its live tensors, no device-side copies), records how long
training was blocked (``Checkpointer.last_save``, one report line per save); DCP then writes in a
background thread into ``.tmp_step_…`` while training goes on. Rank 0 finishes in that thread: once DCP
has every rank's writes it writes the manifest (size + sha256 of every file) last and renames the
directory into place, then prunes (``keep_last`` newest + every ``keep_every`` steps). A directory named
``step_*`` therefore exists only complete; a kill at any moment leaves at most a ``.tmp_*`` directory,
removed at the next start. ``latest`` passes over (and reports) a checkpoint whose files do not match its
manifest.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.staging import AsyncStager, BlockingAsyncStager, DefaultStager, StagingOptions

from .errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "sfd_scale.dcp.v1"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: named, with the reason."""


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> dict:
    """sfd_scale's version and, when it runs from a git checkout, the commit (and whether it was modified)."""
    from . import __version__

    out = {"sfd_scale": __version__, "torch": str(torch.__version__)}
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            out.update(git_commit=head.stdout.strip(), git_modified=bool(dirty.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# ----------------------------------------------------------------------------------------------- objects
# Small objects (config, counters, RNG states) are stored as uint8 tensors of their torch.save bytes:
# DCP would otherwise flatten nested dicts into keys of their own, and they load with
# ``weights_only=True`` (plain types and tensors only, no pickled code).
def pack(obj) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def unpack(t: torch.Tensor):
    return torch.load(io.BytesIO(t.numpy().tobytes()), weights_only=True)


# ----------------------------------------------------------------------------------------------- verify
def verify(directory: Path) -> Optional[str]:
    """None when every file listed in the manifest is there with its size and sha256; else the reason."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        for name, meta in manifest["files"].items():
            path = directory / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != meta["bytes"]:
                return f"{name} has {path.stat().st_size} bytes, the manifest says {meta['bytes']}"
            if _sha256(path) != meta["sha256"]:
                return f"{name} does not match its sha256 in the manifest"
        return None
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST} ({err})"


def latest(output_dir: str | os.PathLike, report: Callable[[str], None] = log.warning) -> Optional[Path]:
    """Newest checkpoint whose files verify against its manifest; each one passed over is reported."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for directory in sorted(root.glob("step_*"), reverse=True):
        problem = verify(directory)
        if problem is None:
            return directory
        report(f"skipping checkpoint {directory}: {problem}")
    return None


def manifest(directory: Path) -> dict:
    return json.loads((Path(directory) / MANIFEST).read_text())


def _publish(tmp: Path, final: Path, info: dict) -> None:
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    info = {**info, "format": FORMAT,
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files}}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(info, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # a re-save of the same step (e.g. the final save after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)  # the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(output_dir: str | os.PathLike, keep_last: int, keep_every: int) -> list:
    """Delete published checkpoints other than the ``keep_last`` newest and multiples of ``keep_every``."""
    root = Path(output_dir) / "checkpoints"
    steps = sorted(int(p.name[5:]) for p in root.glob("step_*"))
    keep = set(steps[-keep_last:]) if keep_last > 0 else set(steps)
    keep |= {s for s in steps if keep_every and s % keep_every == 0}
    removed = [s for s in steps if s not in keep]
    for s in removed:
        shutil.rmtree(checkpoint_dir(output_dir, s), ignore_errors=True)
    return removed


def remove_unfinished(output_dir: str | os.PathLike) -> list:
    """``.tmp_*`` directories of saves that never finished (a kill during a save); rank 0 at start."""
    root = Path(output_dir) / "checkpoints"
    gone = sorted(root.glob(".tmp_step_*")) if root.is_dir() else []
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


# ----------------------------------------------------------------------------------------------- staging
class StateStager(AsyncStager):
    """What ``dcp.async_save`` copies before it returns, so that training may change the live tensors next.

    Device tensors (CUDA) go into pinned host buffers that the first save allocates and every later save
    reuses (DCP's ``BlockingAsyncStager`` with its cached staged state dict: no pinning, no allocation, no
    device memory per save; the copy runs at pinned-memory bandwidth). The cache is keyed by name, so it
    holds whether the caller passes live tensors or fresh ones; a state of another layout (names, shapes,
    dtypes) gets new buffers. Reusing the buffers is safe because ``Checkpointer.save`` first waits for the
    previous save's background write. Host tensors (all of them on CPU; the packed objects otherwise) are
    copied by DCP's plain stager, which also reuses its copy of a tensor it has seen (live CPU weights)."""

    _synchronize_after_execute = False  # stage() returns only once everything is copied

    def __init__(self):
        self._host = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                                  use_async_staging=False, use_non_blocking_copy=False))
        self._device: Optional[BlockingAsyncStager] = None
        self._layout: Optional[list] = None

    def stage(self, state_dict: Dict[str, object]) -> Dict[str, object]:
        on_device = {k: v for k, v in state_dict.items() if torch.is_tensor(v) and v.device.type != "cpu"}
        staged = self._host.stage({k: v for k, v in state_dict.items() if k not in on_device})
        if on_device:
            layout = [(k, tuple(v.shape), v.dtype, v.device) for k, v in on_device.items()]
            if layout != self._layout:
                self._device, self._layout = BlockingAsyncStager(cache_staged_state_dict=True), layout
            staged.update(self._device.stage(on_device))
        return staged

    def synchronize_staging(self) -> None:  # staging is blocking: nothing in flight
        pass

    def close(self) -> None:
        self._host.close()
        self._device = self._layout = None


# ----------------------------------------------------------------------------------------------- save
class Checkpointer:
    """Collective saves through DCP on a process group of its own (the background writer's collectives
    must not interleave with training's). One save in flight at a time.

    ``last_save`` holds the seconds the latest ``save`` blocked its caller: ``blocking_s`` in all, of which
    ``waited_s`` waiting for the previous save's write and ``staging_s`` copying the state to host memory
    (with ``asynchronous=False``: the whole write); ``report`` gets one line per save (the trainer points it
    at the run log)."""

    def __init__(self, output_dir: str | os.PathLike, keep_last: int = 3, keep_every: int = 0,
                 asynchronous: bool = True):
        self.out, self.keep_last, self.keep_every = Path(output_dir), keep_last, keep_every
        self.asynchronous = asynchronous
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._pending: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.stager = StateStager() if asynchronous else None
        self.last_save: Dict[str, float] = {}
        self.report: Callable[[str], None] = log.info

    def save(self, step: int, state: Dict[str, object], info: dict) -> Path:
        """Start saving ``state`` (this rank's keys; live tensors: they are staged before this returns) as
        step ``step``; returns the final directory. ``info`` goes into the manifest (rank 0's)."""
        started = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - started
        final = checkpoint_dir(self.out, step)
        tmp = final.parent / f".tmp_{final.name}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if self.group is not None:
            dist.barrier(group=self.group)
        kwargs = dict(checkpoint_id=str(tmp), process_group=self.group, no_dist=self.group is None)
        staging = time.perf_counter()
        with _quiet_if_one_process(self.group is None):
            if self.asynchronous:  # returns once staged in host memory
                future = dcp.async_save(state, async_stager=self.stager, **kwargs)
            else:
                dcp.save(state, **kwargs)
                future = None
        done = time.perf_counter()
        self.last_save = {"step": step, "blocking_s": done - started, "waited_s": waited, "staging_s": done - staging}
        self.report(f"checkpoint step {step}: training blocked {done - started:.3f} s (waiting for the previous save "
                    f"{waited:.3f} s, {'staging to host memory' if self.asynchronous else 'writing'} "
                    f"{done - staging:.3f} s)" + ("; writing in the background" if self.asynchronous else ""))

        def finish() -> None:
            try:
                if future is not None:
                    future.result()
                if self.rank == 0:
                    _publish(tmp, final, {**info, "step": step})
                    prune(self.out, self.keep_last, self.keep_every)
            except BaseException as err:  # surfaced by the next wait()
                self._error = err

        if self.asynchronous:
            self._pending = threading.Thread(target=finish, name=f"checkpoint-{step}", daemon=True)
            self._pending.start()
        else:
            finish()
            self._raise()
        return final

    def wait(self) -> None:
        """Block until the save in flight is written and published (rank 0) or written (others)."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"checkpoint save failed: {err}") from err


# ----------------------------------------------------------------------------------------------- load
def stored_keys(directory: Path) -> Dict[str, object]:
    """Key -> DCP metadata (tensor: ``.size`` / ``.properties.dtype``; object: bytes) of a checkpoint."""
    return dict(FileSystemReader(str(directory)).read_metadata().state_dict_metadata)


def empty_like_stored(directory: Path, keys: Iterable[str], meta: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """Tensors of the stored shapes and dtypes to load ``keys`` into; CheckpointError naming a missing key."""
    meta = stored_keys(directory) if meta is None else meta
    out = {}
    for key in keys:
        m = meta.get(key)
        if m is None or not hasattr(m, "size"):
            raise CheckpointError(f"checkpoint {directory} has no tensor {key!r}")
        out[key] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
    return out


@contextlib.contextmanager
def _quiet_if_one_process(no_dist: bool):
    """DCP warns that it "assumes the intent" to read or write in one process; here that is the intent (tools,
    one-process runs), so the warning is silenced there and only there."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def load(directory: Path, state: Dict[str, object], group=None) -> Dict[str, object]:
    """Fill ``state`` (tensors of the right shapes, placeholders for objects) from ``directory``; each rank
    reads only its keys. Collective over ``group`` when distributed."""
    no_dist = not (dist.is_initialized() and dist.get_world_size() > 1)
    with _quiet_if_one_process(no_dist):
        dcp.load(state, checkpoint_id=str(directory), process_group=group, no_dist=no_dist)
    return state


def read_weights(directory: str | os.PathLike, which: str = "ema") -> Dict[str, torch.Tensor]:
    """Full official-named weights (``ema`` or ``model``) of a checkpoint, in one process (tools)."""
    directory = Path(directory)
    problem = verify(directory)
    if problem is not None:
        raise CheckpointError(f"checkpoint {directory} cannot be used: {problem}")
    meta = stored_keys(directory)
    keys = [k for k in meta if k.startswith(which + "/")]
    if not keys:
        raise CheckpointError(f"checkpoint {directory} has no {which!r} weights")
    state = empty_like_stored(directory, keys, meta)
    with _quiet_if_one_process(True):
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    return {k[len(which) + 1:]: v for k, v in state.items()}


def read_object(directory: str | os.PathLike, key: str):
    """One stored object (``config``, ``trainer``, ``counters``), in one process."""
    state = empty_like_stored(Path(directory), [key])
    with _quiet_if_one_process(True):
        dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    return unpack(state[key])
