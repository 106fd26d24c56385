"""Lock files of a streaming prefix go with its last local user, also when a node's ranks exit at once."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

from sfd_scale import streaming_leases
from sfd_scale.streaming_leases import StreamingLease


def test_ranks_releasing_at_once_leave_no_lock_files(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming_leases, "_lease_dir", lambda: tmp_path / "leases")
    root = tmp_path / "locks"
    root.mkdir()
    locks = [root / "000007_cache_filelock", root / "000007_barrier_filelock"]
    for f in locks:
        f.touch()
    dataset = SimpleNamespace(_shm_prefix_int=7, _filelock_root=str(root))
    ours = StreamingLease()
    ours.record(dataset)
    # the other rank of the node: a live process of its own (our parent)
    other = StreamingLease()
    other.path = tmp_path / "leases" / f"000007_{os.getppid()}.json"
    other.path.write_text(json.dumps({"prefix": 7, "filelock_root": str(root), "pid": os.getppid(),
                                      "started": streaming_leases._start_time(os.getppid())}))
    # it releases while we look at its lease: each saw the other's lease, and neither deleted the lock files
    alive, interleaved = streaming_leases._alive, []

    def alive_while_the_other_releases(lease):
        if not interleaved:
            interleaved.append(True)
            other.release(dataset)
        return alive(lease)

    monkeypatch.setattr(streaming_leases, "_alive", alive_while_the_other_releases)
    ours.release(dataset)
    assert interleaved and not any(f.exists() for f in locks)
    assert not list((tmp_path / "leases").iterdir())


def test_a_live_user_keeps_the_lock_files(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming_leases, "_lease_dir", lambda: tmp_path / "leases")
    (tmp_path / "000003_cache_filelock").touch()
    dataset = SimpleNamespace(_shm_prefix_int=3, _filelock_root=str(tmp_path))
    ours = StreamingLease()
    ours.record(dataset)
    other = tmp_path / "leases" / f"000003_{os.getppid()}.json"
    other.write_text(json.dumps({"prefix": 3, "filelock_root": str(tmp_path), "pid": os.getppid(),
                                 "started": streaming_leases._start_time(os.getppid())}))
    ours.release(dataset)
    assert (tmp_path / "000003_cache_filelock").exists() and other.exists() and not ours.path.exists()
