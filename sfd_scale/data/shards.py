"""Latent shards: sfd_scale's training-data format (mosaicml-streaming MDS) and its loader.

A dataset root holds
  ``part_NNNNNNN/``        one MDS directory per chunk of the input (``index.json``, ``shard.*.mds`` and
                           ``moments.safetensors``: per-channel sums for the statistics). A part is written
                           aside (``.tmp_part_*``) and renamed into place when complete, so a crashed writer leaves no
                           half part behind and a rerun skips the finished ones;
  ``index.json``           streaming's index over all parts, merged in part order (the dataset order);
  ``stats.safetensors``    per-channel ``latents_mean/_std`` and ``latents_sv_mean/_std``, (1,C,1,1) f32;
  ``sfd_dataset.json``     format version, sample count, columns, provenance (written last).
Sample columns use the official key names: ``latents``/``latents_flip`` (texture latents of the image
and of its mirror image), ``label`` (int64), optional ``latents_sv``/``latents_sv_flip`` (semantic
latents) and ``feats_dino``/``feats_dino_flip`` (REPA targets).

``LatentShardDataset`` is a ``StreamingDataset``: shard-aware shuffling and an order that depends on
(seed, epoch, ``canonical_nodes``) but not on the number of ranks or workers. It returns what the
official reader returns (``composite_latent``), with the flip drawn from (seed, epoch, sample index).
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from streaming import MDSWriter, StreamingDataset
from streaming.base.util import merge_index

FORMAT_VERSION = 1
PAIRED = ("latents", "latents_sv", "feats_dino", "latents_dino")  # each comes with a ``_flip`` twin
STATS_FILE, META_FILE, INDEX_FILE, MOMENTS_FILE = "stats.safetensors", "sfd_dataset.json", "index.json", \
    "moments.safetensors"


class ShardFormatError(ValueError):
    """A latent-shard dataset is missing, incomplete or inconsistent; the message names the file/key."""


# ------------------------------------------------------------------------------------------ the math
def composite_latent(latents: torch.Tensor, latents_sv: Optional[torch.Tensor], stats: Dict[str, torch.Tensor],
                     latent_norm: bool, latent_sv_norm: bool, multiplier: float,
                     latents_dino: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SFD's training input from stored latents (SFD_ALGORITHM.md §2), in the official operation order:
    ``m * concat[(tex - mean)/std, dino, (sem - sv_mean)/sv_std]``, each normalisation only when its flag
    is on. Tensors are (N, C, H, W) float32; stats are (1, C, 1, 1)."""
    parts = [(latents - stats["latents_mean"]) / stats["latents_std"] if latent_norm else latents]
    if latents_dino is not None:  # legacy official block, inserted un-normalised
        parts.append(latents_dino)
    if latents_sv is not None:
        parts.append((latents_sv - stats["latents_sv_mean"]) / stats["latents_sv_std"] if latent_sv_norm
                     else latents_sv)
    return torch.cat(parts, dim=1) * multiplier


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def flip_choice(seed: int, epoch: int, index: int) -> bool:
    """Whether sample ``index`` reads its mirrored entries in ``epoch``: a fair coin keyed by all three
    (a splitmix64 hash chain: ~1 us, per sample in the loader), so it does not depend on ranks, workers or
    where a run resumed."""
    return bool(_splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ epoch) ^ index) >> 63)


# ------------------------------------------------------------------------------------------ writing
def column_encodings(sample: Dict[str, np.ndarray]) -> Dict[str, str]:
    """MDS column encodings for samples shaped like ``sample`` (fixed dtype and shape per column)."""
    cols = {}
    for key, value in sample.items():
        if key == "label":
            cols[key] = "int64"
            continue
        value = np.asarray(value)
        cols[key] = f"ndarray:{value.dtype.name}:{','.join(str(d) for d in value.shape)}"
    for key in PAIRED:
        if (key in cols) != (f"{key}_flip" in cols):
            raise ShardFormatError(f"sample has '{key}' without '{key}_flip' (or the reverse)")
    if "latents" not in cols or "label" not in cols:
        raise ShardFormatError(f"a sample needs 'latents', 'latents_flip' and 'label'; got {sorted(cols)}")
    return cols


class Moments:
    """Per-channel sums (float64) of the non-flipped latents, for exact mean and unbiased std."""

    def __init__(self):
        self.sums: Dict[str, torch.Tensor] = {}

    def add(self, key: str, x: np.ndarray) -> None:
        x = torch.from_numpy(np.asarray(x, dtype=np.float64)).reshape(x.shape[0], -1)  # (C, H*W)
        s = torch.stack([x.sum(1), (x * x).sum(1), torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64)])
        self.sums[key] = self.sums.get(key, 0) + s

    def merge(self, other: Dict[str, torch.Tensor]) -> None:
        for key, s in other.items():
            self.sums[key] = self.sums.get(key, 0) + s

    def stats(self) -> Dict[str, torch.Tensor]:
        out = {}
        for key, (s1, s2, n) in self.sums.items():
            mean = s1 / n
            var = (s2 - s1 * mean) / (n - 1)
            out[f"{key}_mean"] = mean.float().view(1, -1, 1, 1)
            out[f"{key}_std"] = var.clamp_min(0).sqrt().float().view(1, -1, 1, 1)
        return out


def parts_dir(root) -> Path:
    """Parts live directly under the root: streaming's merged index names shards relative to the root by
    their part directory only."""
    return Path(root)


def part_name(chunk: int) -> str:
    return f"part_{chunk:07d}"


def finished_parts(root) -> List[str]:
    """Names of the complete parts under ``root`` (a part directory only exists once it is complete)."""
    d = parts_dir(root)
    return sorted(p.name for p in d.iterdir() if p.name.startswith("part_") and (p / INDEX_FILE).is_file()) \
        if d.is_dir() else []


def remove_unfinished(root, chunk: Optional[int] = None) -> None:
    """Temporary part directories left by killed writers (all of them, or those of one chunk)."""
    prefix = f".tmp_{part_name(chunk)}_" if chunk is not None else ".tmp_part_"
    if parts_dir(root).is_dir():
        for p in parts_dir(root).iterdir():
            if p.name.startswith(prefix):
                shutil.rmtree(p, ignore_errors=True)


class PartWriter:
    """Writes one part: ``with PartWriter(root, chunk) as w: w.write(sample)``. It appears
    only when the block exits without an error; otherwise its temporary directory is removed."""

    def __init__(self, root, chunk: int, size_limit: int = 1 << 27):
        self.final = parts_dir(root) / part_name(chunk)
        self.tmp = parts_dir(root) / f".tmp_{part_name(chunk)}_{socket.gethostname()}_{os.getpid()}"
        self.root, self.chunk = root, chunk
        self.size_limit, self.writer, self.moments, self.count = size_limit, None, Moments(), 0

    def __enter__(self) -> "PartWriter":
        remove_unfinished(self.root, self.chunk)  # a killed earlier attempt at this chunk
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        return self

    def write(self, sample: Dict[str, np.ndarray]) -> None:
        if self.writer is None:
            self.writer = MDSWriter(out=str(self.tmp), columns=column_encodings(sample), size_limit=self.size_limit)
        self.writer.write(sample)
        self.moments.add("latents", sample["latents"])
        if "latents_sv" in sample:
            self.moments.add("latents_sv", sample["latents_sv"])
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.writer is None:
            if self.writer is not None:
                self.writer.cancel_future_jobs()
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        self.writer.finish()
        save_file(self.moments.sums, str(self.tmp / MOMENTS_FILE))
        if self.final.exists():  # another rank finished the same chunk first: identical content
            shutil.rmtree(self.tmp)
            return
        os.replace(self.tmp, self.final)


def finalize(root, meta: dict, stats: Optional[Dict[str, torch.Tensor]] = None) -> dict:
    """Merge the parts' indexes into ``root/index.json`` and write the statistics (summed from the parts'
    moments unless given) and ``sfd_dataset.json`` (last: its presence marks a complete dataset)."""
    root = Path(root)
    names = finished_parts(root)
    if not names:
        raise ShardFormatError(f"no finished part under {parts_dir(root)}")
    remove_unfinished(root)  # every writer is done when finalizing
    for stale in (META_FILE, INDEX_FILE):  # a re-finalize: the dataset is incomplete until META is back
        (root / stale).unlink(missing_ok=True)
    logging.disable(logging.WARNING)  # merge_index chats on the root logger about its temporary folder
    try:
        merge_index([str(parts_dir(root) / n / INDEX_FILE) for n in names], str(root), keep_local=True)
    finally:
        logging.disable(logging.NOTSET)
    if stats is None:
        moments = Moments()
        for n in names:
            moments.merge(load_file(str(parts_dir(root) / n / MOMENTS_FILE)))
        stats = moments.stats()
    save_file({k: v.contiguous() for k, v in stats.items()}, str(root / STATS_FILE))
    index = json.loads((root / INDEX_FILE).read_text())
    info = {"format_version": FORMAT_VERSION, "num_samples": sum(s["samples"] for s in index["shards"]),
            "parts": len(names), "columns": dict(zip(index["shards"][0]["column_names"],
                                                      index["shards"][0]["column_encodings"])), **meta}
    tmp = root / f".tmp_{META_FILE}"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, root / META_FILE)
    return info


# ------------------------------------------------------------------------------------------ reading
def read_meta(root) -> dict:
    path = Path(root) / META_FILE
    if not path.is_file():
        raise ShardFormatError(f"{path} not found: {root} is not a finished sfd_scale latent dataset "
                               f"(run tools/extract_latents.py or tools/import_official_latents.py)")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta


def latent_channels(columns: Dict[str, str]) -> int:
    """Channels of the composite latent the loader builds from these columns."""
    return sum(int(columns[k].split(":")[2].split(",")[0]) for k in ("latents", "latents_dino", "latents_sv")
               if k in columns)


def read_stats(root) -> Dict[str, torch.Tensor]:
    path = Path(root) / STATS_FILE
    if not path.is_file():
        raise ShardFormatError(f"statistics file {path} not found")
    return load_file(str(path))


@dataclass
class Normalization:
    latent_norm: bool = True
    latent_sv_norm: bool = True
    multiplier: float = 1.0


MAX_OPEN_SHARDS = 64  # mmaps a loader process keeps open (each holds a file descriptor)


def _fixed_layout(reader) -> Optional[tuple]:
    """(read-only mmap view of a local raw MDS shard, [(column, dtype, count, shape, byte offset)]) when every
    column is a fixed-size ``ndarray:<dtype>:<shape>`` or a fixed-width number and the shard is neither
    compressed nor missing; None otherwise (then streaming reads it). The MDS sample layout: a uint32 sample
    count, uint32 offsets of every sample, then each sample's columns back to back."""
    if reader.compression or not hasattr(reader, "column_encodings"):
        return None
    columns, offset = [], 0
    for name, encoding, size in zip(reader.column_names, reader.column_encodings, reader.column_sizes):
        parts = encoding.split(":")
        if parts[0] == "ndarray" and len(parts) == 3 and size:
            shape = tuple(int(d) for d in parts[2].split(","))
            dtype = np.dtype(parts[1])
        elif len(parts) == 1 and size and encoding in ("int64", "int32", "float32", "float64", "uint8"):
            shape, dtype = (), np.dtype(encoding)
        else:
            return None
        count = int(np.prod(shape)) if shape else 1
        if count * dtype.itemsize != size:
            return None
        columns.append((name, dtype, count, shape, offset))
        offset += size
    path = os.path.join(reader.dirname, reader.split or "", reader.raw_data.basename)
    try:
        with open(path, "rb") as f:
            view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    except (OSError, ValueError):
        return None
    return view, columns


class LatentShardDataset(StreamingDataset):
    """Batches (``collate``): ``{"latent": (B,C,H,W) f32, "label": i64, "index": i64[, "repa": (B,D,h,w) in
    the stored dtype]}``; ``read`` gives one such item with ``repa`` as float32, as the official reader.

    ``batch_size`` is the per-rank batch (streaming partitions with it); ``replication`` gives that many
    consecutive ranks the same samples (a model-parallel group). The order depends on
    ``canonical_nodes`` and ``seed``, not on the number of ranks: keep both fixed for a run.
    """

    def __init__(self, root, *, batch_size: int, seed: int = 0, shuffle: bool = True, hflip: bool = True,
                 norm: Normalization = Normalization(), repa: bool = False, replication: Optional[int] = None,
                 canonical_nodes: int = 8, remote: Optional[str] = None, fast_local_reads: bool = True, **kwargs):
        self.meta = read_meta(root)
        cols = self.meta["columns"]
        if repa and "feats_dino" not in cols:
            raise ShardFormatError(f"REPA features requested but {root} has no 'feats_dino' column "
                                   f"(columns: {sorted(cols)})")
        if remote is None:
            # Nothing to download: let streaming's ready thread run ahead freely. Its default look-ahead
            # (8 batches) makes it poll with 7 ms sleeps, which halves local-disk throughput (measured).
            kwargs.setdefault("predownload", 1 << 40)
        super().__init__(local=str(root), remote=remote, shuffle=shuffle, shuffle_seed=seed, batch_size=batch_size,
                         replication=replication, num_canonical_nodes=canonical_nodes, **kwargs)
        self.stats = read_stats(root)
        self.seed, self.hflip, self.norm, self.repa = seed, hflip, norm, repa
        self._fast = remote is None and fast_local_reads
        self._layouts: Dict[int, tuple] = {}  # shard -> (mmap view, column layout), LRU order; per process
        self._streaming_only: set = set()     # shards the fast path cannot read
        self.has_sv, self.has_dino_block = "latents_sv" in cols, "latents_dino" in cols
        self._epoch = 0

    def get_item(self, sample_id: int, retry: int = 7) -> dict:
        """Local, uncompressed shards whose columns all have a fixed size (everything sfd_scale writes) are read
        as zero-copy views of one read-only mmap per shard file and process; anything else goes through
        streaming. Why: streaming opens the shard file for every sample and re-parses every column's encoding
        string on every read (about half of a read's cost), and decodes both flips of every column; the views
        let the batch collate copy only what it uses. ``benchmarks/loader_cpu.md`` has the measurements;
        ``tests/data/test_shards.py`` checks both paths give the same samples."""
        shard_id, row = self.spanner[sample_id]
        if not self._fast or shard_id in self._streaming_only:
            return super().get_item(sample_id, retry)
        layout = self._layouts.pop(shard_id, None)
        if layout is None:
            layout = _fixed_layout(self.shards[shard_id])
            if layout is None:
                self._streaming_only.add(shard_id)
                return super().get_item(sample_id, retry)
            while len(self._layouts) >= MAX_OPEN_SHARDS:  # each map holds a file descriptor: keep the recent ones
                self._layouts.pop(next(iter(self._layouts)))
        self._layouts[shard_id] = layout  # most recently used last
        view, columns = layout
        begin = int(np.frombuffer(view, np.uint32, 1, (1 + row) * 4)[0])
        return {name: np.frombuffer(view, dtype, count, begin + offset).reshape(shape) if shape else
                np.frombuffer(view, dtype, 1, begin + offset)[0]
                for name, dtype, count, shape, offset in columns}

    def __getstate__(self) -> dict:  # loader workers started with spawn re-open their own maps
        state = self.__dict__.copy()
        state["_layouts"], state["_streaming_only"] = {}, set()
        return state

    def _resume_incr_epoch(self):
        # Each worker learns here which epoch it iterates; the flip choice is keyed by it.
        epoch, offset = super()._resume_incr_epoch()
        self._epoch = epoch
        return epoch, offset

    def __getitem__(self, index: int) -> dict:
        flip = self.hflip and flip_choice(self.seed, self._epoch, int(index))
        return self.raw(int(index), flip)

    def raw(self, index: int, flip: bool) -> dict:
        """Sample ``index``'s stored arrays for the chosen flip, not normalised (``collate`` does that per
        batch: one vectorised normalisation instead of one per sample)."""
        raw = self.get_item(index)
        sfx = "_flip" if flip else ""
        out = {key: raw[key + sfx] for key in ("latents", "latents_sv", "latents_dino") if key in raw}
        if self.repa:
            out["repa"] = raw["feats_dino" + sfx]
        out["label"], out["index"] = int(raw["label"]), index
        return out

    @property
    def collate(self) -> "ShardCollate":
        return ShardCollate(self.stats, self.norm, self.has_sv)

    def read(self, index: int, flip: bool) -> dict:
        """Sample ``index`` with the flip chosen by the caller, normalised like a training batch."""
        item = {k: v[0] for k, v in self.collate([self.raw(index, flip)]).items()}
        if "repa" in item:
            item["repa"] = item["repa"].float()  # as the official reader returns it
        return item


class ShardCollate:
    """Stacks raw samples (one copy of streaming's read-only arrays) and builds the composite latent for the
    whole batch; elementwise the same operations as the official per-sample reader."""

    def __init__(self, stats: Dict[str, torch.Tensor], norm: Normalization, has_sv: bool):
        self.stats, self.norm, self.has_sv = stats, norm, has_sv

    def __call__(self, samples: List[dict]) -> dict:
        def stacked(key):
            return torch.from_numpy(np.stack([s[key] for s in samples])).float() if key in samples[0] else None

        latent = composite_latent(stacked("latents"), stacked("latents_sv"), self.stats, self.norm.latent_norm,
                                  self.norm.latent_sv_norm and self.has_sv, self.norm.multiplier,
                                  stacked("latents_dino"))
        batch = {"latent": latent, "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
                 "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64)}
        if "repa" in samples[0]:  # kept in the stored dtype (float16 halves what workers pass on); the
            batch["repa"] = torch.from_numpy(np.stack([s["repa"] for s in samples]))  # trainer casts it on device
        return batch
