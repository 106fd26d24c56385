"""Sampling for FID: class-balanced, seeded per image, split over ranks without a process group, resumable.

``sample_for_fid(model, cfg, out_dir, num_images)`` writes into ``out_dir``:

  images/{index:06d}.png           one PNG per image
  parts/part_{a:06d}_{b:06d}.npz   images a..b-1 (``images`` uint8 (n, H, W, 3), ``labels``, ``indices``): the
                                   unit of resumption, written after its PNGs (temp name, fsync, rename)
  samples_{N}x{H}x{W}x3.npz        ADM format (``arr_0`` images in index order, ``arr_1`` labels), once complete
  grid.png, fid_samples.json       a sample grid; the settings (checked on resume) and, once merged, the result

Determinism. Image i gets label ``balanced_labels(i)`` (``num_images // num_classes`` per class) and initial
noise from its own generator keyed by (``sample.seed``, i); the solvers are deterministic ODE integrators
given the noise (no stochastic sampler exists in ``diffusion/sampling.py``). Work is cut into canonical batches
[kB, (k+1)B) of the global index; rank r of W takes batches r, r+W, ... and a restart samples only indices
without a part. So images do not depend on the world size or on restarts. With a fixed-step solver (euler,
heun2, ...) they do not depend on the batch size either (bit-exact on CPU; on a GPU the BLAS kernels chosen
per shape can move a pixel by one). An adaptive solver (dopri5, ...) picks its steps from the whole batch, so
its images depend on the batch: a resume with another batch size is refused.

Merging: any rank that finds every index in a part merges, under an O_EXCL lock file (a lock left by a dead
process on this host, or older than an hour, is broken; merging is idempotent, so a doubled merge is harmless).
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch

from ..atomic import atomic_path
from ..config import Config, ConfigError, guidance_config, sampler_config, sfd_spec
from ..errors import UserError
from ..logging import show_progress
from ..diffusion.sampling import ADAPTIVE_METHODS, Sampler, balanced_labels

FID_NOISE_KEY = 0x464944   # "FID": spawn key that keeps these draws apart from the trainer's (seed, step, index)
MANIFEST, LOCK, STALE_LOCK_S = "fid_samples.json", "merge.lock", 3600.0
_PART = re.compile(r"part_(\d+)_(\d+)\.npz")
_TMP = re.compile(r"\.tmp_(?:part_)?(\d+)[._]")


class FidSamplingError(UserError, ValueError):
    """Bad arguments or an output directory that cannot be continued; the message says which and why."""


@dataclass
class FidSamples:
    out_dir: Path
    npz: Optional[Path]     # the ADM file, when every image is done and merged (by this call or an earlier one)
    grid: Optional[Path]
    sampled: int            # images this call generated
    skipped: int            # images of this rank's share found already done

    @property
    def complete(self) -> bool:
        return self.npz is not None


def image_noise(indices: torch.Tensor, seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Initial noise (n, *shape) on the CPU: image i from its own generator keyed by (seed, i)."""
    out = []
    for i in indices.tolist():
        key = np.random.SeedSequence([seed, i], spawn_key=(FID_NOISE_KEY,)).generate_state(1, np.uint64)[0]
        out.append(torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(key) & (2**63 - 1))))
    return torch.stack(out)


def fid_labels(indices: torch.Tensor, num_images: int, num_classes: int) -> torch.Tensor:
    """Class-balanced labels by global index (no draw from the global RNG)."""
    return balanced_labels(indices, num_images, num_classes, generator=torch.Generator().manual_seed(0))


def rank_and_world(rank: Optional[int] = None, world_size: Optional[int] = None) -> Tuple[int, int]:
    """Arguments, else RANK / WORLD_SIZE from the environment, else (0, 1)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world < 1 or not 0 <= rank < world:
        raise FidSamplingError(f"rank {rank} does not fit world size {world}")
    return rank, world


def _atomic(path: Path, write: Callable, sync: bool = False) -> None:
    """``write(file)`` into ``path``, atomically (``sfd_scale/atomic.py``; temporaries named ``.tmp_<path name>…``,
    which ``_clean_temps`` recognises)."""
    with atomic_path(path, sync) as tmp, open(tmp, "wb") as f:
        write(f)


def _write_json(path: Path, obj: dict) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()), sync=True)


def _settings(cfg: Config, checkpoint, num_images: int, num_classes: int) -> dict:
    """What the images depend on, flattened (a resume must match it)."""
    s = {"checkpoint": None if checkpoint is None else str(checkpoint), "num_images": num_images,
         "num_classes": num_classes, "seed": cfg.sample.seed}
    s.update({f"sample.{k}": v for k, v in asdict(cfg.sample).items() if k not in ("grid_images", "seed")})
    s.update({f"model.{k}": v for k, v in asdict(cfg.model).items()})
    s.update({f"sfd.{k}": getattr(cfg.sfd, k) for k in ("texture_chans", "semantic_chans", "delta_t")})
    s.update({f"data.{k}": getattr(cfg.data, k) for k in ("source", "latent_norm", "latent_sv_norm",
                                                          "latent_multiplier", "demo_samples")})
    if cfg.data.source == "demo":
        s["train.seed"] = cfg.train.seed  # the demo's decoder statistics come from it
    return json.loads(json.dumps(s))


def _prepare(out: Path, settings: dict, batch_size: int, method: str) -> dict:
    for d in (out, out / "images", out / "parts"):
        d.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST
    if not path.is_file():
        from ..checkpoint_store import code_version

        _write_json(path, {"format": "sfd_scale.fid_samples.v1", "settings": settings, "batch_size": batch_size,
                           "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "code": code_version()})
    info = json.loads(path.read_text())
    old = info.get("settings", {})
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        raise FidSamplingError(f"{out} holds samples made with other settings ({', '.join(diff)} differ): "
                               f"use another output directory or delete it")
    if method in ADAPTIVE_METHODS and info["batch_size"] != batch_size:
        raise FidSamplingError(f"{out} was sampled with batch size {info['batch_size']} and the adaptive solver "
                               f"{method!r}, whose images depend on the batch: continue with batch size "
                               f"{info['batch_size']}")
    return info


def _parts(out: Path) -> list:
    found = [(int(m[1]), int(m[2]), p) for p in (out / "parts").iterdir() if (m := _PART.fullmatch(p.name))]
    return sorted(found, key=lambda t: (t[0], -t[1]))


def _done_mask(out: Path, n: int) -> np.ndarray:
    done = np.zeros(n, bool)
    for a, b, _ in _parts(out):
        done[a:min(b, n)] = True
    return done


def images_done(out_dir) -> Tuple[int, int]:
    """(images already in parts, images wanted) of a sampling directory: what every rank has done so far."""
    out = Path(out_dir)
    n = json.loads((out / MANIFEST).read_text())["settings"]["num_images"]
    return int(_done_mask(out, n).sum()), n


def _runs(pending: np.ndarray, offset: int) -> list:
    """Contiguous [a, b) runs of True in ``pending`` (indices shifted by ``offset``)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], pending.astype(np.int8), [0]])))
    return [(offset + int(a), offset + int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _clean_temps(out: Path, owns: Callable[[int], bool]) -> None:
    """Remove temp files (left by a killed run) whose first index this rank owns now."""
    for d in (out / "images", out / "parts"):
        for p in d.iterdir():
            m = _TMP.match(p.name)
            if m and owns(int(m[1])):
                p.unlink(missing_ok=True)


def _rgb_uint8(images) -> np.ndarray:
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 4 or arr.dtype != np.uint8 or arr.shape[-1] not in (1, 3):
        raise FidSamplingError(f"decode must return uint8 images (B, H, W, 1|3), got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr)


def _write_part(out: Path, a: int, b: int, images: np.ndarray, labels: np.ndarray, png: bool) -> None:
    from PIL import Image

    if png:
        for k in range(b - a):
            _atomic(out / "images" / f"{a + k:06d}.png", lambda f: Image.fromarray(images[k]).save(f, format="PNG"))
    _atomic(out / "parts" / f"part_{a:06d}_{b:06d}.npz",
            lambda f: np.savez(f, images=images, labels=labels, indices=np.arange(a, b)), sync=True)





def sample_for_fid(model: torch.nn.Module, cfg: Config, out_dir, num_images: int, decode: Optional[Callable] = None,
                   *, batch_size: int = 64, num_classes: Optional[int] = None, guide: Optional[Callable] = None,
                   rank: Optional[int] = None, world_size: Optional[int] = None, device=None, checkpoint=None,
                   png: bool = True, progress: Optional[bool] = None, merge: bool = True, group=None,
                   after_part: Optional[Callable[[int, int], None]] = None) -> FidSamples:
    """Sample this rank's share of ``num_images`` FID images into ``out_dir`` (see the module docstring) and merge
    when every part is there. ``rank`` / ``world_size`` default to RANK / WORLD_SIZE; under tensor parallelism
    pass the data-parallel ones and the TP ``group``: its ranks sample together, its first rank decides what is
    left to do and alone writes. ``decode``: the run's decoder (``TrainingData.decode``, ``SamplingRun.decode``),
    required while images are left to do; ``guide`` defaults to ``load_guide`` for autoguidance. ``checkpoint`` is
    recorded (and checked on resume). ``progress``: a bar on rank 0 (``logging.show_progress``: None = when stderr
    is a terminal). ``after_part(a, b)``: a test hook."""
    import torch.distributed as dist
    from tqdm import tqdm

    if num_images < 1 or batch_size < 1:
        raise FidSamplingError(f"num_images ({num_images}) and batch size ({batch_size}) must be >= 1")
    rank, world = rank_and_world(rank, world_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    args, spec, out = model.args, sfd_spec(cfg), Path(out_dir)
    num_classes = num_classes or args.num_classes
    writer = group is None or dist.get_rank(group) == 0
    batches = [k for k in range(-(-num_images // batch_size)) if k % world == rank]
    share = sum(min(num_images, (k + 1) * batch_size) - k * batch_size for k in batches)
    plan = None
    if writer:
        try:
            _prepare(out, _settings(cfg, checkpoint, num_images, num_classes), batch_size, cfg.sample.method)
            _clean_temps(out, lambda i: i < num_images and (i // batch_size) % world == rank)
            pending = ~_done_mask(out, num_images)
            plan = [r for k in batches for r in _runs(pending[k * batch_size:(k + 1) * batch_size], k * batch_size)]
            if plan and decode is None:
                raise ConfigError(f"decoding data.source={cfg.data.source!r} samples needs the texture VAE: set "
                                  f"sample.texture_vae (sfd sample-fid --texture-vae)")
        except Exception as err:  # peers must not wait for a plan that never comes
            plan = err
    if group is not None:
        box = [str(plan) if isinstance(plan, Exception) else plan]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        plan = plan if writer else (FidSamplingError(box[0]) if isinstance(box[0], str) else box[0])
    if isinstance(plan, Exception):
        raise plan
    todo = sum(b - a for a, b in plan)
    if todo and guide is None and cfg.sample.guidance == "autoguidance":
        from .generate import load_guide
        guide = load_guide(cfg, device)
    sampler = Sampler(model, spec, sampler_config(cfg), guidance_config(cfg), guide=guide,
                      null_class=args.num_classes) if todo else None
    shape = (spec.channels, args.input_size, args.input_size)
    was_training = model.training
    model.eval()
    bar = tqdm(total=todo, unit="img", desc=f"FID samples rank {rank}/{world}", dynamic_ncols=True,
               disable=not (writer and show_progress(progress, rank)))
    try:
        for a, b in plan:
            idx = torch.arange(a, b)
            labels = fid_labels(idx, num_images, num_classes)
            latents = sampler.sample(image_noise(idx, cfg.sample.seed, shape).to(device), labels.to(device))
            if writer:
                _write_part(out, a, b, _rgb_uint8(decode(latents)), labels.numpy(), png)
            bar.update(b - a)
            if after_part is not None:
                after_part(a, b)
    finally:
        bar.close()
        model.train(was_training)
    result = FidSamples(out, None, None, todo, share - todo)
    if writer and merge:
        merged = merge_samples(out, cfg.sample.grid_images)
        if merged is not None:
            result.npz, result.grid = merged
    return result


def _lock(out: Path) -> bool:
    """Take the merge lock (O_EXCL); break it once when its holder died on this host or it is over an hour old."""
    path = out / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                age = time.time() - path.stat().st_mtime
            except OSError:
                continue  # released meanwhile: try again
            try:
                holder = json.loads(path.read_text())
                dead = holder["host"] == socket.gethostname() and not _alive(int(holder["pid"]))
            except (OSError, ValueError, KeyError, TypeError):
                dead = False  # just created and not written yet (or gone)
            if not dead and age < STALE_LOCK_S:
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, f)
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _read_part(p: Path, a: int, b: int, n: int, num_classes: int, shape=None):
    import zipfile
    try:
        with np.load(p) as z:
            images, labels, ind = z["images"], z["labels"], z["indices"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise FidSamplingError(f"{p} cannot be read ({err}): delete it and rerun") from None
    if images.dtype != np.uint8 or images.shape[0] != b - a or (shape is not None and images.shape[1:] != shape) \
            or not np.array_equal(ind, np.arange(a, b)) \
            or not np.array_equal(labels, fid_labels(torch.from_numpy(ind), n, num_classes).numpy()):
        raise FidSamplingError(f"{p} does not hold images {a}..{b - 1} with their labels: delete it and rerun")
    return images, labels


def merge_samples(out_dir, grid_images: int = 16) -> Optional[Tuple[Path, Path]]:
    """(ADM npz, grid PNG) once every index of ``out_dir`` is in a part: merged here unless another process holds
    the lock or it is done already. None while parts are missing or another process merges."""
    out = Path(out_dir)
    info = json.loads((out / MANIFEST).read_text())
    n, num_classes = info["settings"]["num_images"], info["settings"]["num_classes"]
    if info.get("npz") and (out / info["npz"]).is_file():
        return out / info["npz"], out / info["grid"]
    runs, nxt = [], 0  # (part file, first row, last row) covering 0..n-1 once, in order
    for a, b, p in _parts(out):
        if b > nxt:
            if a > nxt:
                return None
            runs.append((p, nxt - a, min(b, n) - a, a, b))
            nxt = min(b, n)
    if nxt < n or not _lock(out):
        return None
    import zipfile

    from ..data.demo import save_image_grid

    for stale in out.glob(".tmp_samples_*"):  # a killed merge's (we hold the lock)
        stale.unlink(missing_ok=True)
    want = set(np.linspace(0, n - 1, min(n, max(grid_images, 1))).round().astype(int).tolist())
    grid, labels = [], []
    try:
        shape = _read_part(runs[0][0], runs[0][3], runs[0][4], n, num_classes)[0].shape[1:]
        name = f"samples_{n}x{shape[0]}x{shape[1]}x3.npz"
        with atomic_path(out / name, sync=True) as tmp, \
                zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:  # streamed: one part in memory at a time
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, *shape)})
                for p, lo, hi, a, b in runs:
                    images, lab = _read_part(p, a, b, n, num_classes, shape)
                    f.write(np.ascontiguousarray(images[lo:hi]).tobytes())
                    labels.append(lab[lo:hi])
                    grid += [images[i - a] for i in range(a + lo, a + hi) if i in want]
            with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.concatenate(labels).astype(np.int64))
        save_image_grid(np.stack(grid), out / "grid.png", nrow=min(8, len(grid)), scale=max(1, 64 // shape[0]))
        info.update(npz=name, grid="grid.png", image_shape=[*shape], merged=time.strftime("%Y-%m-%dT%H:%M:%S"))
        _write_json(out / MANIFEST, info)
        _clean_temps(out, lambda i: True)
        return out / name, out / "grid.png"
    finally:
        (out / LOCK).unlink(missing_ok=True)
