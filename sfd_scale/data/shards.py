"""Latent shards: sfd_scale's training-data format (mosaicml-streaming MDS) and its loader.

A dataset root holds
  ``part_NNNNNNN/``        one MDS directory per chunk of the input (``index.json``, ``shard.*.mds`` and
                           ``moments.safetensors``: per-channel sums for the statistics). A part is written
                           aside (``.tmp_part_*``) and renamed into place when complete, so a crashed writer leaves no
                           half part behind and a rerun skips the finished ones;
  ``index.json``           streaming's index over all parts, merged in part order (the dataset order), with
                           each shard file's size and content checksum (checked on first read: ``shard_check.py``);
  ``stats.safetensors``    per-channel ``latents_mean/_std`` and ``latents_sv_mean/_std``, (1,C,1,1) f32;
  ``sfd_dataset.json``     format version, sample count, columns, provenance (written last).
Sample columns use the official key names: ``latents``/``latents_flip`` (texture latents of the image
and of its mirror image), ``label`` (int64), optional ``latents_sv``/``latents_sv_flip`` (semantic
latents), ``feats_dino``/``feats_dino_flip`` (REPA targets) and ``image`` (the crop as JPEG bytes, for REPA targets
computed online: ``online_repa.py``).

``LatentShardDataset`` is a ``StreamingDataset``: shard-aware shuffling and an order that depends on
(seed, epoch, ``canonical_nodes``) but not on the number of ranks or workers. Its iteration yields sample
keys (index, flip), the flip drawn from (seed, epoch, sample index); ``read_batch`` turns keys into what
the official reader returns (``composite_latent``), a batch at a time.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from streaming import MDSWriter, StreamingDataset
from streaming.base.util import merge_index

from ..atomic import atomic_path, write_text
from .images import pack_images
from .shard_check import (CHECKSUM, ShardFile, ShardFormatError, ShardVerifier, entry_of_reader, readable_by_offset,
                          unverified_warning)

FORMAT_VERSION = 1
PAIRED = ("latents", "latents_sv", "feats_dino", "latents_dino")  # each comes with a ``_flip`` twin
STATS_FILE, META_FILE, INDEX_FILE, MOMENTS_FILE = "stats.safetensors", "sfd_dataset.json", "index.json", \
    "moments.safetensors"


# ------------------------------------------------------------------------------------------ the math
def composite_latent(latents: torch.Tensor, latents_sv: Optional[torch.Tensor], stats: Dict[str, torch.Tensor],
                     latent_norm: bool, latent_sv_norm: bool, multiplier: float,
                     latents_dino: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SFD's training input from stored latents (SFD_ALGORITHM.md §2), in the official operation order:
    ``m * concat[(tex - mean)/std, dino, (sem - sv_mean)/sv_std]``, each normalisation only when its flag
    is on. Tensors are (N, C, H, W) on the CPU; stats are (1, C, 1, 1) float32."""
    blocks = [latents] + ([latents_dino] if latents_dino is not None else []) + \
        ([latents_sv] if latents_sv is not None else [])
    latent = torch.cat([b.float() for b in blocks], dim=1)
    normalize_composite_(latent.numpy(), stats, latent_norm, latent_sv_norm, multiplier, latents.shape[1],
                         0 if latents_sv is None else latents_sv.shape[1])
    return latent


def normalize_composite_(latent: np.ndarray, stats: Dict[str, torch.Tensor], latent_norm: bool,
                         latent_sv_norm: bool, multiplier: float, tex_channels: int, sv_channels: int) -> None:
    """``composite_latent``'s normalisation, in place on the concatenated float32 blocks [tex, dino, sem].

    Single float32 subtractions, divisions and multiplications are correctly rounded in numpy as in torch, so
    this is bit-identical to the official out-of-place torch code (the golden tests check it). numpy, because
    the loader runs this in reader threads: torch's elementwise kernels there would each start an OpenMP team
    on the same cores as the training loop's (measured: 10x slower batches on 2 cores). Multiplying by 1.0 is
    an exact identity and skipped."""
    def normalize(block: np.ndarray, key: str) -> None:
        np.subtract(block, stats[f"{key}_mean"].numpy(), out=block)
        np.divide(block, stats[f"{key}_std"].numpy(), out=block)

    if latent_norm:
        normalize(latent[:, :tex_channels], "latents")
    if sv_channels and latent_sv_norm:
        normalize(latent[:, latent.shape[1] - sv_channels:], "latents_sv")
    if multiplier != 1.0:
        np.multiply(latent, np.float32(multiplier), out=latent)


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
        if isinstance(value, bytes):  # the crop's JPEG (online REPA targets): variable size
            cols[key] = "bytes"
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
            self.writer = MDSWriter(out=str(self.tmp), columns=column_encodings(sample), size_limit=self.size_limit,
                                    hashes=[CHECKSUM])  # in index.json: shard_check verifies it on first read
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
    write_text(root / META_FILE, json.dumps(info, indent=2))
    return info


# ------------------------------------------------------------------------------------------ reading
def fetch_dataset_files(root, remote: Optional[str]) -> None:
    """With a remote dataset, download its ``stats.safetensors`` and ``sfd_dataset.json`` into the local cache
    ``root`` when they are not there yet (streaming fetches the index and the shards itself). Each is written
    aside and renamed into place: the ranks of a node may fetch at the same time."""
    if remote is None:
        return
    from streaming.base.storage.download import CloudDownloader

    for name in (STATS_FILE, META_FILE):  # META last: its presence marks a complete dataset
        dest = Path(root) / name
        if dest.is_file():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(dest) as tmp:
                CloudDownloader.direct_download(os.path.join(remote, name), str(tmp))
        except Exception as err:
            raise ShardFormatError(f"cannot fetch {os.path.join(remote, name)} into {root}: {err}") from err


def require_images(root, columns) -> None:
    """ShardFormatError unless a dataset's ``columns`` hold the crops' JPEGs (``image``: online REPA targets)."""
    if "image" not in columns:
        raise ShardFormatError(f"data.repa_features=online needs the images in the shards, but {root} has no 'image' "
                               f"column: extract with images=true (or import official latents with --images)")


def read_meta(root) -> dict:
    path = Path(root) / META_FILE
    if not path.is_file():
        raise ShardFormatError(f"{path} not found: {root} is not a finished sfd_scale latent dataset "
                               f"(run sfd extract or sfd import-latents)")
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


MAX_OPEN_SHARDS = 64  # shard files a loader process keeps open (least recently used closed first)
STORED_KEYS = ("latents", "latents_dino", "latents_sv")  # the composite latent's stored blocks, in order
def _column_spec(encoding: str) -> Tuple[np.dtype, Tuple[int, ...]]:
    """(dtype, per-sample shape) of an MDS column encoding (``ndarray:<dtype>:<shape>`` or a number)."""
    parts = encoding.split(":")
    if parts[0] == "ndarray":
        return np.dtype(parts[1]), tuple(int(d) for d in parts[2].split(","))
    return np.dtype(encoding), ()


def _column_array(encoding: str, batch: int) -> np.ndarray:
    """An empty (batch, *shape) array for an MDS column encoding."""
    dtype, shape = _column_spec(encoding)
    return np.empty((batch, *shape), dtype)


class LatentShardDataset(StreamingDataset):
    """SFD training batches from latent shards: streaming decides the order, ``read_batch`` reads the bytes.

    Iterating the dataset (streaming's shuffle, rank/worker partition and resume) yields sample keys
    ``(index, flip)``, the flip drawn from (seed, epoch, index). ``read_batch(keys)`` reads a list of keys into
    ``{"latent": (B,C,H,W) f32, "label": i64, "index": i64[, "repa": (B,D,h,w) in the stored dtype]}`` (with
    ``images``, also the samples' JPEG bytes and flips: ``images.pack_images``); ``read``
    gives one such item with ``repa`` as float32, as the official reader. Splitting order from reading lets a
    batch be read where it is consumed (reader threads, ``sources.ShardBatches``) straight into its arrays.

    ``batch_size`` is the per-rank batch (streaming partitions with it); ``replication`` gives that many
    consecutive ranks the same samples (a model-parallel group). The order depends on
    ``canonical_nodes`` and ``seed``, not on the number of ranks: keep both fixed for a run.
    """

    def __init__(self, root, *, batch_size: int, seed: int = 0, shuffle: bool = True, hflip: bool = True,
                 norm: Normalization = Normalization(), repa: bool = False, images: bool = False,
                 replication: Optional[int] = None,
                 canonical_nodes: int = 8, remote: Optional[str] = None, fast_local_reads: bool = True, **kwargs):
        fetch_dataset_files(root, remote)
        self.meta = read_meta(root)
        cols = self.meta["columns"]
        if repa and "feats_dino" not in cols:
            raise ShardFormatError(f"REPA features requested but {root} has no 'feats_dino' column "
                                   f"(columns: {sorted(cols)})")
        if images:
            require_images(root, cols)
        if remote is None:
            # Nothing to download: let streaming's ready thread run ahead freely. Its default look-ahead
            # (8 batches) makes it poll with 7 ms sleeps, which halves local-disk throughput (measured).
            kwargs.setdefault("predownload", 1 << 40)
        super().__init__(local=str(root), remote=remote, shuffle=shuffle, shuffle_seed=seed, batch_size=batch_size,
                         replication=replication, num_canonical_nodes=canonical_nodes, **kwargs)
        self._warn_unverified(root)
        self.stats = read_stats(root)
        self.seed, self.hflip, self.norm, self.repa, self.images = seed, hflip, norm, repa, images
        self.remote = remote
        self.local_reads = remote is None and fast_local_reads
        # the composite latent's blocks: stored column -> its channels in the latent, in STORED_KEYS order
        self._blocks: Dict[str, slice] = {}
        start = 0
        for key in STORED_KEYS:
            if key in cols:
                width = _column_spec(cols[key])[1][0]
                self._blocks[key], start = slice(start, start + width), start + width
        self._latent_shape = (start, *_column_spec(cols["latents"])[1][1:])  # (C, H, W)
        self._epoch = 0
        self._init_files()

    def _warn_unverified(self, root) -> None:
        """One warning when some shard has no checksum (``shard_check``: the others are checked on first read)."""
        unverified = sum(entry_of_reader(reader).digest is None for reader in self.shards)
        if unverified:
            warnings.warn(unverified_warning(root, unverified, len(self.shards)), stacklevel=3)

    def _init_files(self) -> None:
        self._files: "OrderedDict[int, Optional[ShardFile]]" = OrderedDict()  # LRU; None: read via streaming
        self._files_lock = threading.Lock()
        self._verifier = ShardVerifier({i: entry_of_reader(reader) for i, reader in enumerate(self.shards)})

    def __getstate__(self) -> dict:  # loader worker processes open their own files and check them themselves
        state = self.__dict__.copy()
        state.pop("_files"), state.pop("_files_lock"), state.pop("_verifier")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_files()

    def _resume_incr_epoch(self):
        # The process iterating learns here which epoch it iterates; the flip choice is keyed by it.
        epoch, offset = super()._resume_incr_epoch()
        self._epoch = epoch
        return epoch, offset

    def __getitem__(self, index: int) -> tuple:
        """The key of sample ``index`` in the epoch being iterated. Remote shards are read right here (streaming
        downloads ahead of this call and may evict a shard after it), local ones later by ``read_batch``."""
        index = int(index)
        return self._key(index, self.hflip and flip_choice(self.seed, self._epoch, index))

    def _key(self, index: int, flip: bool) -> tuple:
        if self.remote is None:
            return index, flip
        # Streaming has downloaded the whole shard into the local cache by now. It checks a hash only as it
        # downloads, and then merely logs a mismatch from its download thread and reads the file anyway.
        sample = self.get_item(index)
        self._verifier.require([int(self.spanner[index][0])])
        return index, flip, sample

    def _shard_file(self, shard_id: int) -> Optional[ShardFile]:
        with self._files_lock:  # reader threads share the open files
            if shard_id in self._files:
                self._files.move_to_end(shard_id)
                return self._files[shard_id]
        reader = self.shards[shard_id]  # opened outside the lock: starting the readahead may block
        opened = ShardFile(reader) if self.local_reads and readable_by_offset(reader) else None
        with self._files_lock:
            opened = self._files.setdefault(shard_id, opened)  # another thread may have opened it meanwhile
            while len(self._files) > MAX_OPEN_SHARDS:
                self._files.popitem(last=False)
            return opened

    def read_batch(self, keys: Sequence[tuple]) -> dict:
        """Read samples ``keys`` (``(index, flip)``, as iteration yields them) and build the training batch.

        Local shards are read with one positional read per column straight into the batch: the latent blocks
        into their channels of the composite latent (normalised in place afterwards), the REPA features into
        their array. That is one copy from the page cache, only of the flip in use, with the GIL released and
        no temporaries. Streaming's own reader opens the shard file and re-parses every column's encoding for
        every sample, and decodes both flips of every column, which made it several times slower
        (``benchmarks/loader_cpu.md``). Remote or compressed shards go through streaming;
        ``tests/data/test_shards.py`` checks that both paths give the same batches. The batch is returned only
        once every local shard it read from passed its content check (``shard_check.ShardVerifier``: hashed in
        the background from its first read on, once per process)."""
        cols, n = self.meta["columns"], len(keys)
        latent = np.empty((n, *self._latent_shape), np.float32)
        # where each stored column lands: a float32 block straight into its channels of the latent, any other
        # dtype into a staging array converted after the loop
        dest, staged = {}, {}
        for key, channels in self._blocks.items():
            dest[key] = latent[:, channels]
            if _column_spec(cols[key])[0] != np.float32:
                staged[key], dest[key] = dest[key], _column_array(cols[key], n)
        if self.repa:
            dest["feats_dino"] = _column_array(cols["feats_dino"], n)
        dest["label"] = _column_array(cols["label"], n)
        local_shards, images = set(), []
        for j, key in enumerate(keys):
            index, flip = key[0], key[1]
            shard_id, row = (int(x) for x in self.spanner[index])
            if len(key) > 2:  # read (and checked) when iterated: remote shards
                file, sample = None, key[2]
            else:
                if shard_id not in local_shards:
                    local_shards.add(shard_id)
                    self._verifier.start(shard_id)
                file = self._shard_file(shard_id)
                sample = self.get_item(index) if file is None else None
            where = file.locate(row) if file is not None else None
            for col, out in dest.items():
                name = col + "_flip" if flip and col != "label" else col
                if file is not None:
                    file.read_into(where, name, out[j:j + 1])
                else:
                    out[j] = sample[name]
            if self.images:  # one JPEG per sample (of the unflipped crop): flipped where it is decoded
                images.append(file.read_bytes(where, "image") if file is not None else
                              np.frombuffer(sample["image"], np.uint8))
        for key, block in staged.items():
            block[...] = dest[key]
        self._verifier.require(local_shards)  # ShardCorruptError naming the file if one is damaged
        sv = self._blocks.get("latents_sv")
        normalize_composite_(latent, self.stats, self.norm.latent_norm, self.norm.latent_sv_norm, self.norm.multiplier,
                             self._blocks["latents"].stop, sv.stop - sv.start if sv else 0)
        batch = {"latent": torch.from_numpy(latent),
                 "label": torch.from_numpy(dest["label"]).to(torch.int64),
                 "index": torch.tensor([key[0] for key in keys], dtype=torch.int64)}
        if self.repa:  # kept in the stored dtype (float16): the trainer casts it on the device
            batch["repa"] = torch.from_numpy(dest["feats_dino"])
        if self.images:
            batch.update(pack_images(images, [bool(key[1]) for key in keys]))
        return batch

    def read(self, index: int, flip: bool) -> dict:
        """Sample ``index`` with the flip chosen by the caller, normalised like a training batch."""
        item = {k: v[0] for k, v in self.read_batch([self._key(index, flip)]).items()}
        if "repa" in item:
            item["repa"] = item["repa"].float()  # as the official reader returns it
        return item
