import os
import stat

import pytest

from sfd_scale import atomic


def test_write_text_publishes_whole_file_with_the_umask_mode(tmp_path):
    target = tmp_path / "out.json"
    atomic.write_text(target, "{}")
    assert target.read_text() == "{}"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "grid.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".tmp_grid.png.")
            assert tmp.suffix == ".png"  # writers that choose a format by extension still see it
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_sync_write_replaces_an_existing_file(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    atomic.write_bytes(target, b"new", sync=True)
    assert target.read_bytes() == b"new"
