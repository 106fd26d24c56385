"""Checkpoint directories on disk: their names, manifest, verification, publishing and retention (ground
floor: no sfd_scale imports, no torch; ``checkpoint_store.py`` writes and reads the DCP contents and re-exports
what its callers use from here).

A checkpoint is a directory named exactly ``step_<7+ digits>`` under ``<output_dir>/checkpoints`` with a
``manifest.json`` written last: format, step (matching the name), and bytes + sha256 of every file. ``verify``
checks the manifest's every field and type, then every listed file; ``{"files": {}}`` or a missing ``.metadata``
is corruption, not an older version.

Nothing good is ever lost:
  * only well-named entries that verify are resumed from (``latest``: newest first) or counted by ``prune``
    toward ``checkpoint.keep_last`` / ``keep_every``; ``prune`` deletes only verified checkpoints that newer
    verified ones make redundant, never the newest one nor the one just saved. Any other ``step_*`` entry
    (``step_0000300_backup``, an empty ``step_9999999``, a damaged save) is reported and left alone.
  * a save of a step whose name is taken (a damaged save the run passed over, or another owner's directory)
    first renames the old entry aside to ``.unusable_step_…`` (a rename needs no right to its contents, so an
    entry the run cannot delete does not block it) and publishes; an old entry that verifies is replaced
    (renamed to ``.replaced_step_…`` and deleted once the new one is published). When even the rename fails
    the save is not published, which is reported, and training goes on; the next save publishes as usual.
  * pruning hashes each checkpoint once per process: a result is remembered while the manifest and the listed
    files keep their stat (size, mtime, ctime, inode), and a save remembers its own checkpoint as verified.
  * a failed save (``save_failure``) is one line naming its cause; for a full disk the space one checkpoint
    needs and the space free. The failed save's partial directory is removed; nothing earlier is touched.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

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


# ----------------------------------------------------------------------------------------------- verify
STEP_NAME = re.compile(r"step_(\d{7,})")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def step_of(path: Path) -> Optional[int]:
    """The step of a directory named exactly ``step_<7+ digits>``; None for any other name."""
    match = STEP_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def _manifest_problem(info, directory: Path) -> Optional[str]:
    """What is wrong with a parsed manifest (every field and its type), or None."""
    if not isinstance(info, dict):
        return f"{MANIFEST} is not a JSON object"
    files = info.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MANIFEST} lists no files ('files' is {json.dumps(files)}, not an object of name -> bytes, sha256)"
    for name, meta in files.items():
        if name in ("", ".", "..", MANIFEST) or "/" in name:
            return f"{MANIFEST} lists an invalid file name {name!r}"
        if not isinstance(meta, dict):
            return f"{MANIFEST}: the entry of {name} is not an object"
        size, sha = meta.get("bytes"), meta.get("sha256")
        if type(size) is not int or size < 0:
            return f"{MANIFEST}: {name} has no byte count (bytes={size!r})"
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            return f"{MANIFEST}: {name} has no sha256 of 64 hex digits (sha256={sha!r})"
    if not isinstance(info.get("format"), str):
        return f"{MANIFEST} has no 'format' string"
    if ".metadata" not in files:
        return f"{MANIFEST} does not list .metadata (the DCP index)"
    step, named = info.get("step"), step_of(directory)
    if type(step) is not int or step < 0:
        return f"{MANIFEST} has no step (step={step!r})"
    if named is not None and step != named:
        return f"{MANIFEST} says step {step}, the directory name says {named}"
    for key in ("layout", "code"):
        if key in info and not isinstance(info[key], dict):
            return f"{MANIFEST}: {key!r} is not an object"
    return None


def verify(directory: Path) -> Optional[str]:
    """None when the manifest is complete (every field and type) and every file it lists is there with its size
    and sha256; else the reason. Files the manifest does not list are not read (DCP reads only listed ones)."""
    directory = Path(directory)
    if not directory.is_dir():
        return "not a directory"
    try:
        info = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError) as err:
        return f"unreadable {MANIFEST} ({err})"
    problem = _manifest_problem(info, directory)
    if problem is not None:
        return problem
    try:
        for name, meta in info["files"].items():
            path = directory / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != meta["bytes"]:
                return f"{name} has {path.stat().st_size} bytes, the manifest says {meta['bytes']}"
            if _sha256(path) != meta["sha256"]:
                return f"{name} does not match its sha256 in the manifest"
    except OSError as err:
        return f"unreadable ({err})"
    return None


# Pruning verifies every checkpoint it counts after every save; hashing them all each time would cost as much as
# the saves. A result is remembered per directory and the stat (size, mtime, ctime, inode) of its manifest and
# every file it lists: a file changed since is hashed again. A save remembers its own checkpoint as verified.
_verified: Dict[str, tuple] = {}  # directory -> (stat key, verify's answer): the latest only
_verified_lock = threading.Lock()


def _stat_key(directory: Path) -> Optional[tuple]:
    try:
        names = [MANIFEST] + sorted(json.loads((directory / MANIFEST).read_text())["files"])
        return tuple((n, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino)
                     for n in names for s in [(directory / n).stat()])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def verify_cached(directory: Path) -> Optional[str]:
    """``verify``, remembered while the directory's files keep their stat (for pruning)."""
    directory = Path(directory)
    key = _stat_key(directory)
    with _verified_lock:
        known = _verified.get(str(directory.resolve()))
    if key is not None and known is not None and known[0] == key:
        return known[1]
    problem = verify(directory)
    if key is not None and key == _stat_key(directory):
        with _verified_lock:
            _verified[str(directory.resolve())] = (key, problem)
    return problem


def _remember_verified(directory: Path) -> None:
    key = _stat_key(directory)
    if key is not None:
        with _verified_lock:
            _verified[str(directory.resolve())] = (key, None)


def entries(output_dir: str | os.PathLike) -> list:
    """Every ``step_*`` entry of ``<output_dir>/checkpoints`` with its step (None when the name is not exactly
    ``step_<7+ digits>``), oldest step first, the ill-named ones last."""
    root = Path(output_dir) / "checkpoints"
    found = [(p, step_of(p)) for p in root.glob("step_*")] if root.is_dir() else []
    return sorted(found, key=lambda e: (e[1] is None, e[1] if e[1] is not None else 0, e[0].name))


def entry_problem(path: Path, step: Optional[int], cached: bool = False) -> Optional[str]:
    """Why an entry cannot be resumed from (its name, then its files), or None."""
    if step is None:
        return "not named step_<7+ digits>: never resumed from nor pruned (rename it to use it)"
    return verify_cached(path) if cached else verify(path)


def newest_verified(output_dir: str | os.PathLike) -> Tuple[Optional[Path], list]:
    """(newest well-named checkpoint whose files verify, or None; (entry, what is wrong) for each entry passed
    over: every ill-named one, and the well-named ones newer than the one found)."""
    found = entries(output_dir)
    passed = [(path, entry_problem(path, step)) for path, step in found if step is None]
    for path, step in reversed([e for e in found if e[1] is not None]):
        problem = verify(path)
        if problem is None:
            _remember_verified(path)
            return path, passed
        passed.append((path, problem))
    return None, passed


def latest(output_dir: str | os.PathLike, report: Callable[[str], None] = log.warning) -> Optional[Path]:
    """Newest well-named checkpoint whose files verify against its manifest; each entry passed over is reported."""
    path, passed = newest_verified(output_dir)
    for entry, problem in passed:
        report(f"skipping checkpoint {entry}: {problem}")
    return path


def manifest(directory: Path) -> dict:
    return json.loads((Path(directory) / MANIFEST).read_text())


# ----------------------------------------------------------------------------------------------- publish, prune
def _aside(final: Path, kind: str) -> Path:
    """A free hidden name beside ``final`` (``.unusable_step_…``), never globbed as a checkpoint."""
    n = 0
    while (final.parent / (f".{kind}_{final.name}" + (f".{n}" if n else ""))).exists():
        n += 1
    return final.parent / (f".{kind}_{final.name}" + (f".{n}" if n else ""))


def publish(tmp: Path, final: Path, info: dict, report: Callable[[str], None]) -> Optional[Path]:
    """Manifest written last, then ``tmp`` renamed to ``final``; returns ``final``, or None (reported, ``tmp``
    removed) when an earlier entry of that name can be neither moved aside nor replaced."""
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    info = {**info, "format": FORMAT,
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files}}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(info, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    replaced = None
    if final.exists() or final.is_symlink():  # an earlier save of this step (a skipped one, or a re-save)
        problem = verify(final)
        replaced = _aside(final, "unusable" if problem else "replaced")
        try:  # a rename needs no right to the entry's contents, only to checkpoints/
            os.rename(final, replaced)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            report(f"checkpoint step {info['step']} was not published: {final} exists "
                   f"({problem or 'an earlier save of this step'}) and cannot be moved aside ({err}); training goes "
                   f"on, the next checkpoint is saved as usual: move or remove {final}")
            return None
        if problem is not None:
            report(f"moved the unusable checkpoint {final} ({problem}) aside to {replaced}: delete it once it is "
                   f"not needed")
            replaced = None
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)  # the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _remember_verified(final)
    if replaced is not None:  # a verified save of this step, made redundant by the one just published
        try:
            shutil.rmtree(replaced)
        except OSError as err:
            report(f"could not delete {replaced} (the replaced save of {final.name}): {err}")
    return final


def prune(output_dir: str | os.PathLike, keep_last: int, keep_every: int, report: Callable[[str], None] = log.warning,
          keep_step: Optional[int] = None) -> list:
    """Delete the checkpoints that newer verified ones make redundant; returns their steps. Only well-named
    entries that verify count: of those, the ``keep_last`` newest and multiples of ``keep_every`` stay, and the
    newest (and ``keep_step``, the one just saved) is never deleted. Every other entry (ill-named, or failing
    verification) is reported, not counted and left alone; a deletion that fails is reported."""
    good = []
    for path, step in entries(output_dir):
        problem = entry_problem(path, step, cached=True)
        if problem is None:
            good.append((step, path))
        else:
            report(f"checkpoint pruning leaves {path} alone (not counted toward checkpoint.keep_last): {problem}")
    steps = [s for s, _ in good]
    keep = set(steps[-keep_last:]) if keep_last > 0 else set(steps)
    keep |= {s for s in steps if keep_every and s % keep_every == 0} | set(steps[-1:]) | {keep_step}
    removed = []
    for step, path in good:
        if step in keep:
            continue
        try:
            shutil.rmtree(path)
            removed.append(step)
        except OSError as err:
            report(f"could not delete the pruned checkpoint {path}: {err}")
    return removed


def remove_unfinished(output_dir: str | os.PathLike) -> list:
    """``.tmp_*`` directories of saves that never finished (a kill during a save); rank 0 at start."""
    root = Path(output_dir) / "checkpoints"
    gone = sorted(root.glob(".tmp_step_*")) if root.is_dir() else []
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


# ----------------------------------------------------------------------------------------------- save failures
def _causes(err: BaseException):
    """``err`` and what it wraps: its causes and contexts, and each rank's failure in DCP's CheckpointException."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        todo += [f[0] if isinstance(f, tuple) else f for f in (getattr(e, "failures", None) or {}).values()]


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"  # GB, but small test checkpoints in MB


def save_failure(err: BaseException, step: int, directory: Path, need: int) -> str:
    """One line on a failed save: its cause (for a full disk the space needed and free), and what is intact."""
    causes = list(_causes(err))
    os_error = next((e for e in causes if isinstance(e, OSError)), None)
    after = ("; the partial save was removed, the earlier checkpoints are intact: the run resumes from the newest "
             "of them when started again")
    if os_error is not None and os_error.errno == errno.ENOSPC:
        try:
            free = f" ({_size(shutil.disk_usage(directory).free)} free)"
        except OSError:
            free = ""
        return (f"checkpoint step {step} was not saved: no space left on device: need ~{_size(need)} in "
                f"{directory}{free}" + after)
    if os_error is not None:
        where = f": {os_error.filename}" if os_error.filename else ""
        return f"checkpoint step {step} was not saved: {os_error.strerror or os_error}{where}" + after
    inner = causes[-1] if len(causes) > 1 else err
    text = (str(inner).strip().splitlines() or [""])[-1]
    return f"checkpoint step {step} was not saved: {type(inner).__name__}: {text}" + after
