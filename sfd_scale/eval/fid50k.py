"""FID-50K as the paper measures it, in one command on any number of ranks: sample, then score on rank 0.

``fid50k(checkpoint, out_dir, reference, num_images=50000, ...)`` (``sfd fid50k``, slurm/fid50k.sbatch):

1. Every rank samples its share of the class-balanced images into ``out_dir`` (``fid_sampling.sample_for_fid``:
   per-batch parts, resumable, the same images for any number of ranks or restarts).
2. Rank 0 waits until every rank's parts are there and merged into ADM's ``samples_NxHxWx3.npz`` (the last
   rank to finish merges). The merged file is the barrier: there is no process group, so ranks that finish
   early simply exit, and a lone rank 0 started later (one process, after a multi-rank job) finds the work
   done. A rank that dies leaves rank 0 waiting; torchrun and ``srun --kill-on-bad-exit`` stop the others.
3. Rank 0 scores the npz against the reference with ADM's metrics (``fid.evaluate``) and writes
   ``metrics.json`` atomically: fid, sfid, inception_score, precision, recall, num_images, and what they were
   measured with (checkpoint, the sampling settings of ``fid_samples.json``, reference, Inception network,
   FID method, ranks). A metric that the network or the reference cannot give is null, its reason under
   ``unavailable`` (IS needs a network with the 1008-way softmax layer, e.g. NVIDIA's inception-2015-12-05.pt).

Rerunning the same command continues: only missing parts are sampled, and a ``metrics.json`` already made from
the same samples, reference, network and method is returned as it is. The reference and the network are
checked (on rank 0: loaded) before any sampling, so a wrong path fails in seconds, not after hours.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..atomic import atomic_path
from ..logging import show_progress
from .fid import InceptionFeatures, evaluate, reference_keys
from .fid_sampling import MANIFEST, images_done, merge_samples, rank_and_world, sample_for_fid

METRICS = "metrics.json"
POLL_S = 10.0        # how often rank 0 looks for the other ranks' parts
LOG_EVERY_S = 600.0  # a plain progress line while waiting, for job logs (no TTY, no bar)


def wait_for_samples(out_dir, grid_images: int = 16, *, poll_s: float = POLL_S, progress: bool = False,
                     log: Callable[[str], None] = print) -> Path:
    """ADM npz of ``out_dir`` once every rank's parts are there (merged here or by the rank that finished last);
    a bar over all ranks' images meanwhile (``progress``), or a log line every ``LOG_EVERY_S``."""
    from tqdm import tqdm

    out = Path(out_dir)
    done, total = images_done(out)
    last_log = time.monotonic()
    with tqdm(total=total, initial=done, unit="img", desc="FID samples, all ranks", dynamic_ncols=True,
              disable=not progress) as bar:
        while (merged := merge_samples(out, grid_images)) is None:
            time.sleep(poll_s)
            done = images_done(out)[0]
            bar.update(done - bar.n)
            if not progress and time.monotonic() - last_log >= LOG_EVERY_S:
                log(f"waiting for the other ranks: {done} of {total} FID images sampled")
                last_log = time.monotonic()
    return merged[0]


def _unavailable(metrics: dict, extractor: InceptionFeatures, reference: str) -> dict:
    """Why each metric that came out None is missing (what to give instead)."""
    why = {}
    if metrics["is"] is None:
        why["inception_score"] = (f"the Inception network {extractor.path} has no 1008-way softmax layer "
                                  f"('output'): pass NVIDIA's inception-2015-12-05.pt with --inception")
    if metrics["sfid"] is None:
        why["sfid"] = (f"no mixed_6/conv features from {extractor.path} (not in NVIDIA's layout)"
                       if not extractor.has_spatial else f"{reference} has no mu_s/sigma_s and no images")
    if metrics["precision"] is None:
        why["precision"] = why["recall"] = f"{reference} holds statistics only, no images (arr_0)"
    return why


def score_samples(out_dir, npz: Path, reference: str, extractor: InceptionFeatures, *, batch_size: int = 64,
                  fid_method: str = "sqrtm", progress: bool = False, world_size: int = 1) -> dict:
    """``metrics.json`` of ``out_dir`` for the merged ``npz``: read back when it was made from the same inputs,
    else computed (``fid.evaluate``) and written atomically. Returns its content."""
    out = Path(out_dir)
    inputs = {"samples": str(Path(npz).resolve()), "reference": str(Path(reference).resolve()),
              "inception": str(Path(extractor.path).resolve()), "fid_method": fid_method}
    path = out / METRICS
    if path.is_file():
        old = json.loads(path.read_text())
        if all(old.get(k) == v for k, v in inputs.items()):
            return old
    started = time.monotonic()
    m = evaluate(npz, reference, extractor=extractor, batch_size=batch_size, fid_method=fid_method,
                 progress=progress)
    info = json.loads((out / MANIFEST).read_text())
    result = {"fid": m["fid"], "sfid": m["sfid"], "inception_score": m["is"], "precision": m["precision"],
              "recall": m["recall"], "num_images": m["num_images"], "num_reference": m["num_reference"],
              "unavailable": _unavailable(m, extractor, reference), **inputs,
              "checkpoint": info["settings"]["checkpoint"], "sampling": info["settings"],
              "code": info.get("code"), "world_size": world_size,
              "eval_seconds": round(time.monotonic() - started, 1),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with atomic_path(path, sync=True) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1) + "\n")
    return result


def fid50k(checkpoint, out_dir, reference, num_images: int = 50000, *, config_files: Sequence[str] = (),
           overrides: Sequence[str] = (), inception: Optional[str] = None, batch_size: int = 64,
           eval_batch: int = 64, fid_method: str = "sqrtm", png: bool = False, progress: Optional[bool] = False,
           poll_s: float = POLL_S, log: Callable[[str], None] = print) -> Optional[dict]:
    """Sample this rank's share of ``num_images`` from ``checkpoint`` (its config <- ``config_files`` <-
    ``overrides``, as ``sfd sample-fid``) into ``out_dir``; on rank 0 wait for all shares and score them against
    ``reference`` (an ADM reference batch or stats npz) with ``inception`` (None: the shipped network, no IS).
    Returns the metrics on rank 0, None on the others. Ranks: RANK / WORLD_SIZE (torchrun) or srun's.
    ``progress``: bars on rank 0 (``logging.show_progress``: None = when stderr is a terminal)."""
    from ..parallel.slurm_env import slurm_rendezvous
    from .fid_sampling import FidSamplingError
    from .generate import prepare_sampling

    if num_images < 1 or batch_size < 1 or eval_batch < 1:
        raise FidSamplingError(f"the number of images ({num_images}) and the batch sizes ({batch_size}, "
                               f"{eval_batch}) must be >= 1")
    slurm_rendezvous()  # srun tasks: RANK / WORLD_SIZE / LOCAL_RANK from SLURM's variables
    rank, world = rank_and_world()
    progress = show_progress(progress, rank)
    reference = os.fspath(reference)
    reference_keys(reference)  # every rank: a bad reference fails before any sampling
    run = prepare_sampling(checkpoint, config_files, overrides)
    extractor = InceptionFeatures(inception, run.device) if rank == 0 else None  # loaded now: fail fast
    started = time.monotonic()
    samples = sample_for_fid(run.model, run.cfg, out_dir, num_images, run.decode, batch_size=batch_size,
                             num_classes=run.num_classes, guide=run.guide, rank=rank, world_size=world,
                             device=run.device, png=png, progress=progress,
                             checkpoint=str(Path(checkpoint).resolve()))
    log(f"rank {rank}/{world}: sampled {samples.sampled} images ({samples.skipped} of this rank's share were "
        f"already there) in {time.monotonic() - started:.1f} s")
    if rank != 0:
        return None
    npz = samples.npz or wait_for_samples(out_dir, run.cfg.sample.grid_images, poll_s=poll_s, progress=progress,
                                          log=log)
    return score_samples(out_dir, npz, reference, extractor, batch_size=eval_batch, fid_method=fid_method,
                         progress=progress, world_size=world)
