"""Loader throughput: our streaming latent loader against a one-file-per-sample reader of the same data.

Both read the same synthetic samples (official layout: 32x16x16 texture + 16x16x16 semantic latents and
their flips, float32, optionally 768x16x16 float16 DINOv2 features) and return the same normalised
batches. The baseline stores one ``.safetensors`` file per sample and normalises per sample, as the
official ``ImgLatentDataset`` does, in DataLoader worker processes; ours reads MDS shards through
``ShardBatches`` (reader threads for local shards, or worker processes for comparison). Timed after
warm-up batches, with the page cache warm (every file of the loader is read once right before it is
timed: some machines, this one included, page out file cache unused for a minute), or cold (``cold=True``
drops the kernel's page cache before each loader starts: Linux, root only), which is what a first epoch
over a dataset larger than RAM sees.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from ..data.shards import (LatentShardDataset, Normalization, PartWriter, composite_latent, finalize, flip_choice,
                           read_stats)
from ..data.sources import Placement, ShardBatches
from ..streaming_leases import StreamingLease


def synthetic_sample(i: int, feats: bool, size: int = 16) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    s = {"latents": rng.standard_normal((32, size, size), dtype=np.float32),
         "latents_sv": rng.standard_normal((16, size, size), dtype=np.float32)}
    s["latents_flip"], s["latents_sv_flip"] = s["latents"][..., ::-1].copy(), s["latents_sv"][..., ::-1].copy()
    if feats:
        s["feats_dino"] = rng.standard_normal((768, size, size), dtype=np.float32).astype(np.float16)
        s["feats_dino_flip"] = s["feats_dino"][..., ::-1].copy()
    s["label"] = i % 1000
    return s


def write_both(root, n: int, feats: bool, chunk: int = 2048) -> None:
    """The same n samples as latent shards (``root/shards``) and as one file per sample (``root/files``)."""
    root = Path(root)
    (root / "files").mkdir(parents=True, exist_ok=True)
    for k in range(0, n, chunk):
        with PartWriter(root / "shards", k // chunk) as w:
            for i in range(k, min(n, k + chunk)):
                s = synthetic_sample(i, feats)
                w.write(s)
                save_file({key: np.ascontiguousarray(v) for key, v in s.items() if key != "label"} |
                          {"label": np.array([s["label"]])}, str(root / "files" / f"{i:08d}.safetensors"))
    finalize(root / "shards", {"source": "loader benchmark"})


class PerFileDataset(Dataset):
    """Baseline: one file per sample, normalised per sample (the official reader's way)."""

    def __init__(self, files_dir, stats: Dict[str, torch.Tensor], feats: bool, seed: int = 0):
        self.files = sorted(Path(files_dir).glob("*.safetensors"))
        self.stats, self.feats, self.seed = stats, feats, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        t = load_file(str(self.files[i]))
        sfx = "_flip" if flip_choice(self.seed, 0, i) else ""
        latent = composite_latent(t["latents" + sfx][None], t["latents_sv" + sfx][None], self.stats, True, True, 1.0)[0]
        item = {"latent": latent, "label": t["label"][0], "index": torch.tensor(i)}
        if self.feats:
            item["repa"] = t["feats_dino" + sfx]  # stored float16, cast on the device (as ours)
        return item


@dataclass
class LoaderTiming:
    loader: str
    samples_per_s: float
    batches: int


def _time(batches, count: int, batch_size: int, warmup: int = 4) -> float:
    it = iter(batches)
    try:
        for _ in range(warmup):  # worker start, first shard opens, the allocator's first batches
            next(it)
        t0 = time.perf_counter()
        for _ in range(count):
            next(it)
        return count * batch_size / (time.perf_counter() - t0)
    finally:
        if hasattr(it, "close"):
            it.close()  # stop reader threads and workers before the next loader is timed


def read_all(folder) -> None:
    """Bring every file under ``folder`` into the page cache (for the warm rows)."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.read(1 << 24):
                    pass


def drop_page_cache() -> None:
    """Make the next reads come from the disk (needs root on Linux)."""
    import os

    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError as err:
        raise PermissionError(f"cannot drop the page cache through /proc/sys/vm/drop_caches ({err}); "
                              f"cold-cache timings need root on Linux") from None


def _name(loader: str, readers: int, threads: bool) -> str:
    how = "read in the consuming thread" if readers == 0 else "reader threads" if threads else "worker processes"
    return f"{loader}, {how}"


def benchmark(root, n: int, batch_size: int, workers: int, feats: bool, batches: int,
              cold: bool = False, ours_in_processes: bool = True) -> List[LoaderTiming]:
    """Rows: the per-file baseline with ``workers`` DataLoader processes, ours with ``workers`` reader threads
    and (when ``workers`` > 0 and ``ours_in_processes``) ours with ``workers`` worker processes."""
    root = Path(root)
    if not (root / "shards" / "sfd_dataset.json").is_file():
        write_both(root, n, feats)
    stats = read_stats(root / "shards")

    def prepare(folder) -> None:
        if cold:
            drop_page_cache()
        else:
            read_all(folder)

    def endless():  # epochs back to back, as ShardBatches does; the workers end with the generator
        per_file = DataLoader(PerFileDataset(root / "files", stats, feats), batch_size=batch_size, shuffle=True,
                              num_workers=workers, drop_last=True, persistent_workers=workers > 0)
        while True:
            yield from per_file

    prepare(root / "files")
    rows = [LoaderTiming(_name("one file per sample (official-style, per-sample normalisation)", workers, False),
                         _time(endless(), batches, batch_size), batches)]
    for threads in (True, False) if workers and ours_in_processes else (True,):
        lease = StreamingLease.acquire()
        ds = LatentShardDataset(root / "shards", batch_size=batch_size, norm=Normalization(), repa=feats)
        lease.record(ds)
        ours = ShardBatches(ds, 0, Placement(batch_size, num_workers=workers), reader_threads=threads)
        prepare(root / "shards")
        rows.append(LoaderTiming(_name("sfd_scale latent shards (streaming MDS)", workers, threads),
                                 _time(ours, batches, batch_size), batches))
        lease.release(ds)
    return rows
