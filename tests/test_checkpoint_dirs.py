"""Checkpoint directories: the manifest is validated field by field, only well-named checkpoints that verify are
resumed from or counted by pruning, pruning deletes only what newer verified checkpoints make redundant, and a
re-save never needs to delete the entry it replaces."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from sfd_scale import checkpoint_dirs as dirs
from sfd_scale import checkpoint_store as store


def save(out: Path, *steps: int) -> None:
    """Real (tiny, verified) checkpoints of these steps, nothing pruned."""
    saver = store.Checkpointer(out, keep_last=1 << 30, asynchronous=False)
    for step in steps:
        saver.save(step, {"w": torch.full((3,), float(step))}, {})


def names(out: Path) -> list:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def rewrite_manifest(directory: Path, edit) -> None:
    info = json.loads((directory / dirs.MANIFEST).read_text())
    (directory / dirs.MANIFEST).write_text(json.dumps(edit(info)))


def undeletable(monkeypatch, directory: Path) -> None:
    """shutil.rmtree refuses ``directory`` (found by its inode: wherever it is moved), as it would another owner's
    directory (the tests run as root, which file permissions do not stop)."""
    rmtree, inode = shutil.rmtree, directory.stat().st_ino

    def refuse(path, *args, **kwargs):
        if Path(path).exists() and Path(path).stat().st_ino == inode:
            raise PermissionError(13, "Permission denied", str(path))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", refuse)


# ----------------------------------------------------------------------------------------------- verify
def _drop(key):
    return lambda m: {k: v for k, v in m.items() if k != key}


def _first_file(edit):
    def apply(m):
        name = next(n for n in m["files"] if n.endswith(".distcp"))
        m["files"][name] = edit(m["files"][name])
        return m
    return apply


@pytest.mark.parametrize("edit,reason", [
    (lambda m: {**m, "files": {}}, "lists no files"),
    (lambda m: {**m, "files": None}, "lists no files"),
    (lambda m: {**m, "files": ["a.distcp"]}, "lists no files"),
    (lambda m: [m], "is not a JSON object"),
    (_drop("format"), "no 'format' string"),
    (lambda m: {**m, "format": 1}, "no 'format' string"),
    (_drop("step"), "has no step"),
    (lambda m: {**m, "step": "2"}, "has no step"),
    (lambda m: {**m, "step": 3}, "says step 3, the directory name says 2"),
    (lambda m: {**m, "layout": "tp2"}, "'layout' is not an object"),
    (lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k != ".metadata"}}, "does not list .metadata"),
    (lambda m: {**m, "files": {**m["files"], "../x": m["files"][".metadata"]}}, "invalid file name"),
    (_first_file(lambda f: None), "is not an object"),
    (_first_file(lambda f: {**f, "bytes": -1}), "no byte count"),
    (_first_file(lambda f: {**f, "bytes": True}), "no byte count"),
    (_first_file(lambda f: {**f, "bytes": 1.5}), "no byte count"),
    (_first_file(lambda f: {"bytes": f["bytes"]}), "no sha256 of 64 hex digits"),
    (_first_file(lambda f: {**f, "sha256": "XYZ"}), "no sha256 of 64 hex digits"),
    (_first_file(lambda f: {**f, "bytes": f["bytes"] + 1}), "bytes, the manifest says"),
    (_first_file(lambda f: {**f, "sha256": "0" * 64}), "does not match its sha256"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_verify_validates_every_manifest_field(tmp_path, edit, reason):
    save(tmp_path, 2)
    directory = store.checkpoint_dir(tmp_path, 2)
    assert dirs.verify(directory) is None
    rewrite_manifest(directory, edit)
    problem = dirs.verify(directory)
    assert problem is not None and reason in problem, problem


def test_verify_reports_missing_unreadable_and_ignores_unlisted_files(tmp_path):
    save(tmp_path, 2)
    directory = store.checkpoint_dir(tmp_path, 2)
    (directory / "notes.txt").write_text("an unlisted file is not read")
    assert dirs.verify(directory) is None
    (directory / dirs.MANIFEST).write_bytes(b"\x00{garbage")
    assert dirs.verify(directory).startswith("unreadable manifest.json")
    (directory / dirs.MANIFEST).unlink()
    assert dirs.verify(directory) == "no manifest.json"
    assert dirs.verify(tmp_path / "nowhere") == "not a directory"


def test_step_of_accepts_only_step_and_seven_or_more_digits():
    assert dirs.step_of(Path("step_0000300")) == 300 and dirs.step_of(Path("x/step_12345678")) == 12345678
    for name in ("step_0000300_backup", "step_300", "step_", "step_00003OO", ".tmp_step_0000300", "step_-000001"):
        assert dirs.step_of(Path(name)) is None, name


# ----------------------------------------------------------------------------------------------- latest
def test_latest_passes_over_ill_named_and_unverifiable_entries(tmp_path):
    save(tmp_path, 1, 2)
    root = tmp_path / "checkpoints"
    shutil.copytree(root / "step_0000002", root / "step_0000002_backup")  # sorts last by name
    (root / "step_9999999").mkdir()
    notes = []
    assert store.latest(tmp_path, report=notes.append).name == "step_0000002"
    assert any("step_0000002_backup: not named step_<7+ digits>" in n for n in notes)
    assert any("step_9999999: no manifest.json" in n for n in notes)
    path, passed = dirs.newest_verified(tmp_path)
    assert path.name == "step_0000002" and sorted(p.name for p, _ in passed) == ["step_0000002_backup",
                                                                                 "step_9999999"]


# ----------------------------------------------------------------------------------------------- prune
def test_prune_keeps_last_and_every_among_verified_checkpoints(tmp_path):
    save(tmp_path, *range(1, 11))
    assert store.prune(tmp_path, keep_last=2, keep_every=4) == [1, 2, 3, 5, 6, 7]
    assert names(tmp_path) == ["step_0000004", "step_0000008", "step_0000009", "step_0000010"]


def test_prune_never_counts_nor_deletes_entries_that_do_not_verify(tmp_path):
    save(tmp_path, 1, 2, 3, 4)
    root = tmp_path / "checkpoints"
    (root / "step_9999999").mkdir()  # a stray empty newest entry
    shutil.copytree(root / "step_0000001", root / "step_0000001_backup")
    (root / "step_0000003" / ".metadata").write_bytes(b"damaged")
    notes = []
    assert store.prune(tmp_path, keep_last=1, keep_every=0, report=notes.append) == [1, 2]
    assert names(tmp_path) == ["step_0000001_backup", "step_0000003", "step_0000004", "step_9999999"]
    assert len(notes) == 3 and all("alone (not counted toward checkpoint.keep_last)" in n for n in notes)


def test_prune_never_deletes_the_newest_verified_nor_the_one_just_saved(tmp_path):
    save(tmp_path, 5, 10, 20)
    assert store.prune(tmp_path, keep_last=1, keep_every=0, keep_step=5) == [10]
    assert names(tmp_path) == ["step_0000005", "step_0000020"]
    (tmp_path / "checkpoints" / "step_0000020" / "manifest.json").unlink()
    assert store.prune(tmp_path, keep_last=1, keep_every=0) == []  # step 5 is now the newest verified one


def test_prune_reports_a_checkpoint_it_cannot_delete(tmp_path, monkeypatch):
    save(tmp_path, 1, 2)

    undeletable(monkeypatch, store.checkpoint_dir(tmp_path, 1))
    notes = []
    assert store.prune(tmp_path, keep_last=1, keep_every=0, report=notes.append) == []
    assert names(tmp_path) == ["step_0000001", "step_0000002"] and "could not delete" in notes[0]


def test_verify_cached_notices_a_changed_file(tmp_path):
    save(tmp_path, 1)
    directory = store.checkpoint_dir(tmp_path, 1)
    assert dirs.verify_cached(directory) is None
    data = next(directory.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-1])
    assert "bytes, the manifest says" in dirs.verify_cached(directory)


# ----------------------------------------------------------------------------------------------- re-save
def test_resave_moves_an_unusable_entry_aside_even_when_it_cannot_be_deleted(tmp_path, monkeypatch):
    save(tmp_path, 2)
    old = store.checkpoint_dir(tmp_path, 2)
    (old / dirs.MANIFEST).write_text('{"files": {}}')
    undeletable(monkeypatch, old)
    lines = []
    saver = store.Checkpointer(tmp_path, asynchronous=False)
    saver.report = lines.append
    saver.save(2, {"w": torch.zeros(3)}, {})
    assert store.verify(old) is None
    assert names(tmp_path) == [".unusable_step_0000002", "step_0000002"]
    assert (tmp_path / "checkpoints" / ".unusable_step_0000002" / dirs.MANIFEST).read_text() == '{"files": {}}'
    assert any("moved the unusable checkpoint" in line and "lists no files" in line for line in lines), lines


def test_resave_replaces_a_verified_save_of_the_same_step(tmp_path):
    save(tmp_path, 2, 2)
    assert names(tmp_path) == ["step_0000002"] and store.verify(store.checkpoint_dir(tmp_path, 2)) is None


def test_resave_that_cannot_move_the_old_entry_is_reported_and_training_goes_on(tmp_path, monkeypatch):
    save(tmp_path, 1, 2)
    (store.checkpoint_dir(tmp_path, 2) / dirs.MANIFEST).unlink()

    rename = dirs.os.rename

    def refuse(src, dst):
        if Path(src).name == "step_0000002":
            raise PermissionError(1, "Operation not permitted", str(src))
        return rename(src, dst)

    monkeypatch.setattr(dirs.os, "rename", refuse)
    lines = []
    saver = store.Checkpointer(tmp_path, asynchronous=False)
    saver.report = lines.append
    saver.save(2, {"w": torch.zeros(3)}, {})  # does not raise
    assert names(tmp_path) == ["step_0000001", "step_0000002"]
    assert store.latest(tmp_path, report=lambda _: None).name == "step_0000001"
    assert any("checkpoint step 2 was not published" in line and "cannot be moved aside" in line for line in lines)


def test_pruning_after_a_save_hashes_nothing_already_verified(tmp_path, monkeypatch):
    saver = store.Checkpointer(tmp_path, keep_last=2, asynchronous=False)
    saver.save(1, {"w": torch.ones(3)}, {})
    saver.save(2, {"w": torch.ones(3)}, {})
    hashed = []
    sha256 = dirs._sha256
    monkeypatch.setattr(dirs, "_sha256", lambda path: hashed.append(path.parent.name) or sha256(path))
    saver.save(3, {"w": torch.ones(3)}, {})  # hashes its own files for the manifest, then prunes step 1
    assert names(tmp_path) == ["step_0000002", "step_0000003"]
    assert set(hashed) == {".tmp_step_0000003"}
