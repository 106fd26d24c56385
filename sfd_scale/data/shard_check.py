"""One latent shard file: positional reads, and content checksums (a flipped byte stops the run with the
file's name, never trains).

``ShardFile`` reads a local MDS shard by offset (``shards.LatentShardDataset.read_batch``) after checking its
sample table against its index.json entry.

Writing: ``PartWriter`` asks streaming's ``MDSWriter`` for a ``CHECKSUM`` of every shard file (``hashes=[...]``),
which streaming records in the part's ``index.json`` and ``merge_index`` carries into the dataset's; the file
itself is unchanged MDS.

Reading: streaming checks a hash only while it downloads a shard from a remote (``validate_hash``), and then
merely logs a mismatch from its download thread and reads the file anyway (mosaicml-streaming 0.13); a local
dataset is never downloaded at all. So ``ShardVerifier`` checks each shard file once per process, on its first
read: a local one is hashed in a background thread (``VERIFY_THREADS``) while the reader goes on reading it,
and a batch is handed out only once every shard it read from has passed, so no sample of a damaged shard
reaches a training step; a remote one's downloaded copy is checked in the loader worker that reads it. A failure raises
``ShardCorruptError`` naming the file and what to do. Shards written before checksums existed have none:
they load, unverified, with one warning per dataset.

``verify_dataset`` checks every shard of a dataset (``sfd verify-shards``).
"""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import xxhash

from ..errors import DataError

CHECKSUM = "xxh3_64"  # streaming's name for it; several GB/s, so hashing costs less than reading the file
VERIFY_THREADS = 2  # shard files hashed at once by one process (many are opened together at an epoch start)
_READ_CHUNK = 8 << 20


class ShardFormatError(DataError):
    """A latent-shard dataset is missing, incomplete or inconsistent; the message names the file/key."""


class ShardCorruptError(ShardFormatError):
    """A latent shard file's content does not match its index.json entry (size or checksum); names the file."""


@dataclass(frozen=True)
class ShardEntry:
    """One shard file as the dataset's index.json records it: where it is, its size, its checksum (None:
    written before checksums)."""

    path: str
    size: int
    digest: Optional[str]


def entry_of_reader(reader) -> ShardEntry:
    """The ``ShardEntry`` of a streaming shard reader (its raw file)."""
    raw = reader.file_pairs[0][0]
    return ShardEntry(os.path.join(reader.dirname, reader.split or "", raw.basename), raw.bytes,
                      (raw.hashes or {}).get(CHECKSUM))


def dataset_entries(root) -> List[ShardEntry]:
    """Every shard file of the dataset at ``root``, from its merged ``index.json``."""
    index = json.loads((Path(root) / "index.json").read_text())
    return [ShardEntry(str(Path(root) / s["raw_data"]["basename"]), s["raw_data"]["bytes"],
                       (s["raw_data"].get("hashes") or {}).get(CHECKSUM)) for s in index["shards"]]


def file_digest(path: str) -> str:
    """``CHECKSUM`` of a file, read in chunks (the same digest as streaming's hash of the whole content)."""
    hasher = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def shard_problem(entry: ShardEntry) -> Optional[str]:
    """What is wrong with a shard file (missing, wrong size, checksum mismatch), or None; a shard without a
    recorded checksum is checked for its size only."""
    try:
        size = os.path.getsize(entry.path)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if size != entry.size:
        return f"has {size} bytes, index.json records {entry.size}"
    if entry.digest is not None:
        digest = file_digest(entry.path)
        if digest != entry.digest:
            return f"content checksum {CHECKSUM} {digest} does not match index.json's {entry.digest}"
    return None


def corrupt_message(entry: ShardEntry, problem: str) -> str:
    """One line: the file, what is wrong, what to do."""
    part = Path(entry.path).parent
    return (f"latent shard {entry.path} is damaged: {problem}. Restore it from a copy of the dataset, or delete "
            f"its part directory {part} and rerun the extraction (sfd extract or "
            f"sfd import-latents, same arguments: finished parts are kept)")


def unverified_warning(root, unverified: int, total: int) -> str:
    return (f"{unverified} of {total} shard files of {root} carry no content checksum (written before sfd_scale "
            f"recorded them): they are read unverified; re-extract the dataset to have them checked")


# ------------------------------------------------------------------------------------------ positional reads
READAHEAD_REQUEST = 8 << 20


class ShardFile:
    """A local, uncompressed MDS shard open for positional reads: where every sample starts and where each
    column sits inside a sample. MDS layout: a uint32 sample count, the samples' uint32 start offsets (one more
    than samples, the last is the file's end), then the samples. A sample is a head of uint32 sizes, one per
    variable-size column (``bytes``: the encoded images of online REPA targets), then its columns back to back in
    column order. Without variable-size columns a column's place in a sample is fixed; with them ``locate``
    reads the sample's head (one more small read) first. The descriptor closes with the object, i.e. only after
    the last reader thread holding it is done."""

    def __init__(self, reader):
        self.path = os.path.join(reader.dirname, reader.split or "", reader.raw_data.basename)
        self.layout: List[Tuple[str, Optional[int]]] = list(zip(reader.column_names, reader.column_sizes))
        self.head = 4 * sum(size is None for _, size in self.layout)  # bytes of a sample's size head
        self.fixed: Dict[str, Tuple[int, int]] = {}  # columns at a fixed place: name -> (offset in a sample, bytes)
        offset = self.head
        for name, size in self.layout:
            if size is None:
                break
            self.fixed[name] = (offset, size)
            offset += size
        smallest = self.head + sum(size or 0 for _, size in self.layout)
        self.fd = os.open(self.path, os.O_RDONLY)
        table = os.pread(self.fd, 4 * (reader.samples + 1), 4)
        self.starts = np.frombuffer(table, np.uint32)
        sizes = np.diff(self.starts.astype(np.int64))
        if len(self.starts) != reader.samples + 1 or os.fstat(self.fd).st_size < int(self.starts[-1]) or \
                np.any((sizes < smallest) if self.head else (sizes != smallest)):
            os.close(self.fd)
            self.fd = None
            raise ShardFormatError(f"{self.path} is truncated or does not match its index.json entry")
        # Have the kernel read the whole file ahead, asynchronously, as streaming fetches whole shards: the
        # shuffled order reads small pieces at random offsets, for which the kernel's own readahead never
        # starts. In 8 MiB requests: Linux serves one WILLNEED request only up to a few MiB (measured).
        # Nearly free when the file is cached.
        if hasattr(os, "posix_fadvise"):
            for start in range(0, int(self.starts[-1]), READAHEAD_REQUEST):
                os.posix_fadvise(self.fd, start, READAHEAD_REQUEST, os.POSIX_FADV_WILLNEED)

    def locate(self, row: int) -> Tuple[int, Dict[str, Tuple[int, int]]]:
        """(file offset of sample ``row``, column -> (offset in the sample, bytes)): the fixed places, or the
        sample's own, read from its head, when it has variable-size columns."""
        start = int(self.starts[row])
        if not self.head:
            return start, self.fixed
        head = np.frombuffer(os.pread(self.fd, self.head, start), np.uint32)
        if len(head) * 4 != self.head:
            raise ShardFormatError(f"{self.path}: sample {row}: its head is truncated")
        places, offset, sizes = {}, self.head, iter(head.tolist())
        for name, size in self.layout:
            size = next(sizes) if size is None else size
            places[name], offset = (offset, size), offset + size
        return start, places

    def read_into(self, where: Tuple[int, Dict[str, Tuple[int, int]]], column: str, out: np.ndarray) -> None:
        """Column ``column`` of the sample ``where`` (``locate``) into ``out`` (its size)."""
        offset, size = where[1][column]
        got = os.preadv(self.fd, [out], where[0] + offset)  # releases the GIL while copying
        if got != size or out.nbytes != size:
            raise ShardFormatError(f"{self.path}: sample at {where[0]}, column '{column}': read {got} of {size} bytes")

    def read_bytes(self, where: Tuple[int, Dict[str, Tuple[int, int]]], column: str) -> np.ndarray:
        """A variable-size column of the sample ``where`` as a uint8 array."""
        out = np.empty(where[1][column][1], np.uint8)
        self.read_into(where, column, out)
        return out

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


VARIABLE_ENCODINGS = ("bytes",)  # variable-size MDS columns sfd_scale writes (the online REPA images)


def readable_by_offset(reader) -> bool:
    """Every column fixed-size or raw bytes, and the shard stored uncompressed (all that sfd_scale writes)."""
    return not reader.compression and \
        all(size or e in VARIABLE_ENCODINGS for e, size in zip(reader.column_encodings, reader.column_sizes)) and \
        all(e.startswith("ndarray:") or e in ("int64", "int32", "float32", "float64", "uint8") + VARIABLE_ENCODINGS
            for e in reader.column_encodings)


# ------------------------------------------------------------------------------------------ on first read
class ShardVerifier:
    """Checks each shard file of one dataset once, in background threads: ``start`` on a shard's first read,
    ``require`` before its samples leave the reader. Created per process (loader workers make their own)."""

    def __init__(self, entries: Dict[int, ShardEntry]):
        self.entries = entries
        self._checks: Dict[int, Future] = {}
        self._lock = threading.Lock()
        self._pool: Optional[ThreadPoolExecutor] = None

    def start(self, shard_id: int) -> None:
        """Begin checking shard ``shard_id`` unless it was (or is being) checked."""
        with self._lock:
            if shard_id in self._checks:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="sfd-shard-verify")
            self._checks[shard_id] = self._pool.submit(shard_problem, self.entries[shard_id])

    def require(self, shard_ids: Iterable[int]) -> None:
        """Wait for these shards' checks (started if they were not); raises ``ShardCorruptError`` for a bad one."""
        for shard_id in sorted(set(shard_ids)):
            self.start(shard_id)
            problem = self._checks[shard_id].result()
            if problem is not None:
                raise ShardCorruptError(corrupt_message(self.entries[shard_id], problem))

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------ whole dataset
def verify_dataset(root, report=print, progress: bool = False) -> List[str]:
    """Check every shard file of the dataset at ``root``; ``report`` gets one line per damaged shard (and one
    about shards without checksums); ``progress``: a tqdm bar over the shard files. Returns the damaged shards'
    lines."""
    from tqdm import tqdm

    entries = dataset_entries(root)
    bad = []
    for entry in tqdm(entries, desc="verify", unit="shard", dynamic_ncols=True, disable=not progress):
        problem = shard_problem(entry)
        if problem is not None:
            bad.append(corrupt_message(entry, problem))
            report(bad[-1])
    unverified = sum(entry.digest is None for entry in entries)
    if unverified:
        report("warning: " + unverified_warning(root, unverified, len(entries)))
    return bad
