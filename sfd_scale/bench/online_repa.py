"""Online vs stored REPA targets: bytes per training sample, loader samples/s on the CPU, and the GPU time the
online DINOv2 adds to a step (``sfd bench-online-repa`` -> ``benchmarks/online_repa.md``).

* Data: real photos (scikit-image, scikit-learn) cut into ``n`` varied images, extracted by the real extraction
  (``extract.py``, tiny random encoders: the values are stand-ins, the shapes are ImageNet's at 256 x 256) with
  both ``features`` and ``images`` on, so one dataset serves both modes.
* Bytes: each column's bytes per sample from the shard files (the JPEGs' real sizes), and the bytes the loader
  reads per sample, counted at its positional reads (``os.preadv`` / ``os.pread``) while it iterates.
* Loader: ``ShardBatches`` as the trainer runs it; stored mode reads latents + float16 features, online mode
  reads latents + JPEG and decodes the JPEGs with DALI on the CPU (what a GPU run leaves to the host is less:
  nvJPEG decodes there). DINOv2 itself is not timed on the CPU (a ViT-B forward takes seconds per batch here).
* GPU cost: DINOv2 ViT-B/14-reg4 at full size, built on the meta device, one forward of a per-rank batch counted
  aten op by aten op (``dispatch_count.OpCounter`` under ``CudaAutocast`` bf16), priced with the cost model's
  fixed H100 constants (``cost_model.py``): eager, and its GEMM + attention floor (what compiling approaches).
"""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from ..data.encoders import DinoEncoder, flip_crops, unit_images
from ..data.images import ImageDecoder, unpack_images
from ..data.shards import LatentShardDataset, Normalization
from ..data.sources import Placement, ShardBatches
from ..streaming_leases import StreamingLease
from .cost_model import ATTENTION_FLOPS, GEMM_FLOPS, LAUNCH_S, NON_GEMM_BYTES_PER_S
from .dispatch_count import CudaAutocast, OpCounter


# ----------------------------------------------------------------------------------------------- data
def photos() -> List[np.ndarray]:
    """The colour photographs installed with scikit-image and scikit-learn (those needing no download)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina"):
        try:
            out.append(getattr(data, name)()[..., :3])
        except Exception:  # an optional download (pooch) this install lacks
            pass
    out.append(data.stereo_motorcycle()[0])
    return out + list(load_sample_images().images)


def write_photo_tree(root, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs (quality 92) in 4 class folders: random windows (half to all of each side) of the photos,
    resized to a short side of 300-500 pixels, as a varied stand-in for an ImageNet folder."""
    from PIL import Image

    rng, pics, root = np.random.default_rng(seed), photos(), Path(root)
    for i in range(n):
        a = pics[i % len(pics)]
        h, w = (int(s * rng.uniform(0.5, 1.0)) for s in a.shape[:2])
        y, x = rng.integers(0, a.shape[0] - h + 1), rng.integers(0, a.shape[1] - w + 1)
        img = Image.fromarray(np.ascontiguousarray(a[y:y + h, x:x + w]))
        scale = rng.uniform(300, 500) / min(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BICUBIC)
        (root / f"class_{i % 4}").mkdir(parents=True, exist_ok=True)
        img.save(root / f"class_{i % 4}" / f"{i:06d}.jpg", quality=92)
    return root


def extract_dataset(tree, out, resolution: int = 256, jpeg_quality: int = 95) -> Path:
    """The real extraction (tiny random encoders) with features and images, unless ``out`` is finished."""
    from ..data.extract import extract, load_extract_config

    if not (Path(out) / "sfd_dataset.json").is_file():
        extract(load_extract_config(["extract/tiny_cpu"], [  # the shipped config, by name
            f"input={tree}", f"output={out}", f"resolution={resolution}", "images=true", "features=true",
            f"jpeg_quality={jpeg_quality}", "chunk_size=256", "batch_size=16", "progress=false"]), 0, 1)
    return Path(out)


def column_bytes(root) -> Dict[str, float]:
    """Mean bytes per sample of every column (fixed ones from their encodings, the JPEGs measured)."""
    lease = StreamingLease.acquire()
    ds = LatentShardDataset(root, batch_size=1, shuffle=False)
    lease.record(ds)
    try:
        sizes: Counter = Counter()
        for shard in ds.shards:
            for name, size in zip(shard.column_names, shard.column_sizes):
                sizes[name] += (size or 0) * shard.samples
        for index in range(ds.num_samples):
            shard_id, row = (int(x) for x in ds.spanner[index])
            sizes["image"] += ds._shard_file(shard_id).locate(row)[1].get("image", (0, 0))[1]
        return {k: v / ds.num_samples for k, v in sizes.items()}
    finally:
        lease.release(ds)


# ----------------------------------------------------------------------------------------------- loader
@contextmanager
def counting_reads(counter: Counter):
    """Counts the bytes of every ``os.preadv`` / ``os.pread`` (the loader's positional reads) while active."""
    preadv, pread = os.preadv, os.pread

    def counted_preadv(fd, buffers, offset, *a):
        got = preadv(fd, buffers, offset, *a)
        counter["bytes"] += got
        return got

    def counted_pread(fd, n, offset):
        out = pread(fd, n, offset)
        counter["bytes"] += len(out)
        return out

    os.preadv, os.pread = counted_preadv, counted_pread
    try:
        yield counter
    finally:
        os.preadv, os.pread = preadv, pread


def time_loader(root, online: bool, batch: int, batches: int, workers: int, warmup: int = 3) -> Dict[str, float]:
    """samples/s and bytes read per sample of ``batches`` timed batches (after ``warmup``); online: the JPEGs
    decoded (DALI, CPU) and flipped as the training step's targets need them, DINOv2 left out."""
    lease = StreamingLease.acquire()
    ds = LatentShardDataset(root, batch_size=batch, norm=Normalization(), repa=not online, images=online)
    lease.record(ds)
    decoder = ImageDecoder("cpu", max(workers, 1), max_batch=batch) if online else None
    iterator = iter(ShardBatches(ds, 0, Placement(batch, num_workers=workers), reader_threads=True))
    counter: Counter = Counter()

    def next_batch():
        b = next(iterator)
        if decoder is not None:
            encoded, flips = unpack_images(b)
            b["crops"] = flip_crops(decoder.decode(encoded), flips)
        return b

    try:
        for _ in range(warmup):
            next_batch()
        with counting_reads(counter):
            start = time.perf_counter()
            for _ in range(batches):
                next_batch()
            seconds = time.perf_counter() - start
    finally:
        iterator.close()
        lease.release(ds)
    # the reader threads run a few batches ahead: their reads are counted over the batches they read
    return {"samples_per_s": batches * batch / seconds, "bytes_read_per_sample": counter["bytes"] / (batches * batch)}


# ----------------------------------------------------------------------------------------------- GPU cost
def dino_gpu_cost(batch: int, resolution: int = 256) -> Dict[str, float]:
    """Counts of one full-size DINOv2 forward over ``batch`` uint8 crops (meta device, bf16 autocast as on
    CUDA) and its H100 time from the cost model's constants: eager, and the GEMM + attention floor."""
    with torch.device("meta"):
        dino = DinoEncoder(DinoEncoder.build())
    crops = torch.zeros(batch, resolution, resolution, 3, dtype=torch.uint8, device="meta")
    counter = OpCounter(torch.device("meta"))
    with torch.no_grad(), counter, CudaAutocast(torch.bfloat16):
        dino(unit_images(crops, "meta"))
    total = sum(counter.totals.values(), Counter())
    kernels = total["kernels"] + total["gemm_kernels"] + total["attention_kernels"]
    floor = total["gemm_flops"] / GEMM_FLOPS + total["attention_flops"] / ATTENTION_FLOPS
    eager = floor + total["bytes"] / NON_GEMM_BYTES_PER_S + kernels * LAUNCH_S
    return {"batch": batch, "params": sum(p.numel() for p in dino.parameters()),
            "gflop_per_image": (total["gemm_flops"] + total["attention_flops"]) / batch / 1e9,
            "non_gemm_gb": total["bytes"] / 1e9, "kernels": kernels, "eager_ms": eager * 1e3, "floor_ms": floor * 1e3}


def imagenet_arithmetic(cols: Dict[str, float], samples: int = 1_281_167, per_node: float = 4000.0) -> List[dict]:
    """Disk per dataset and reads per node for ImageNet with these per-column sizes. On disk a stored-mode
    dataset has every column but the JPEG, an online one every column but the features; the loader reads the
    latents, label and (feature or JPEG) of the flip in use. ``per_node``: samples/s of a node (8 H100s at
    the 500/s target); "storage" counts whole samples, what a first read of a shard (readahead, checksum,
    remote download) fetches."""
    features = ("feats_dino", "feats_dino_flip")
    rows = []
    for mode, left_out, target in (("stored", ("image",), "feats_dino"), ("online", features, "image")):
        disk = sum(v for k, v in cols.items() if k not in left_out)
        read = cols["latents"] + cols.get("latents_sv", 0) + cols["label"] + cols[target]
        rows.append({"mode": mode, "disk_per_sample_mb": disk / 1e6, "read_per_sample_mb": read / 1e6,
                     "dataset_gb": disk * samples / 1e9, "node_read_gb_s": read * per_node / 1e9,
                     "node_storage_gb_s": disk * per_node / 1e9})
    return rows


def gpu_share(cost: Dict[str, float], step_ms: float) -> float:
    """The online DINOv2's eager time as a share of a training step of ``step_ms``."""
    return cost["eager_ms"] / step_ms if step_ms and not math.isnan(step_ms) else math.nan
