"""Atomic file writes: the one way sfd_scale writes a file that someone may read while it is written.

Other ranks, a resumed run, a concurrent study job or the user must never see half a file. So every writer
writes a hidden temporary sibling (unique per process and call, in the same directory: the rename stays on one
file system), optionally fsyncs it, and renames it onto the target (``os.replace``: atomic on POSIX). If the
write raises, the temporary is removed and the target is untouched. The file gets the mode an ``open()`` would
give (``0o666`` less the umask) whatever its writer chose (safetensors creates 0600 files). Directories (checkpoints,
shard sets) publish by a directory rename of their own (``checkpoint_store.py``, ``data/shards.py``).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # read once at import: os.umask can only be read by setting it


@contextlib.contextmanager
def atomic_path(path: PathLike, sync: bool = False) -> Iterator[Path]:
    """A temporary path next to ``path`` for the block to write; renamed onto ``path`` when the block ends,
    removed if it raises. ``sync``: the data reaches the disk before the name does (fsync before the rename)."""
    path = Path(path)
    # Named, not created: the writer creates it (some, e.g. a downloader, skip an existing file). Unique per
    # process and call; the target's suffix kept last: writers that pick a format by extension still see it.
    tmp = path.with_name(f".tmp_{path.name}.{os.getpid()}.{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        if sync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: PathLike, data: bytes, sync: bool = False) -> Path:
    with atomic_path(path, sync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: PathLike, text: str, sync: bool = False) -> Path:
    return write_bytes(path, text.encode(), sync)


def unwritable_reason(directory: PathLike) -> Optional[str]:
    """Why files could not be written under ``directory`` (created with its parents if missing), or None.
    Checked without writing anything: the directory, or its nearest existing ancestor, must be a directory
    this process may write into and enter."""
    path = Path(directory).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        return f"{existing} is a file, not a directory" if existing is not None else "no existing ancestor"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable" + (" (read-only file system)" if _read_only_fs(existing) else "")
    return None


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
