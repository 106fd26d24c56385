"""Issue #16, "no good checkpoint is ever lost": a tiny demo run with checkpoints at steps 2, 4 and 6 has them
damaged in 18 ways, then auto-resumes to step 10 (checkpoint every 2 steps, keep_last 2). Each variant checks
where the run resumed from, what log.txt says, and which entries are left: the good checkpoints are never
pruned in favour of bad ones, bad ones are reported and left alone (or moved aside when their step is saved
again), an all-bad directory is refused rather than silently restarted, and a full disk stops the run one
step after the failed save with the earlier checkpoints intact. The real-disk variant of ENOSPC runs on a small
tmpfs where this machine lets the test mount one."""
import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sfd_scale import checkpoint_store as store
from sfd_scale.train.trainer import Trainer
from tests.test_checkpoint_dirs import undeletable
from tests.test_checkpoint_store import full_disk
from tests.train.test_trainer import tiny_config

RUN = ["checkpoint.every=2", "checkpoint.keep_last=2", "checkpoint.resume=true", "train.log_every=1"]
STEP = {s: f"step_{s:07d}" for s in (2, 4, 6, 7, 8, 10, 9999999)}
MOVED_6 = [".unusable_step_0000006", STEP[8], STEP[10]]  # step 6 damaged: resumed from 4, 6 saved again


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One run, once per module: checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("trained")
    Trainer(tiny_config(out, "train.max_steps=6", "checkpoint.every=2", "checkpoint.keep_last=3",
                        "train.log_every=1")).fit()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [STEP[2], STEP[4], STEP[6]]
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def names(out: Path) -> list:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def verified(out: Path) -> list:
    return [p.name for p, step in store.entries(out) if step is not None and store.verify(p) is None]


# ----------------------------------------------------------------------------------------------- damage
def _distcp(directory: Path) -> Path:
    return sorted(directory.glob("*.distcp"))[0]


def truncate(d: Path):
    _distcp(d).write_bytes(_distcp(d).read_bytes()[:-7])


def flip_byte(d: Path):
    data = bytearray(_distcp(d).read_bytes())
    data[len(data) // 2] ^= 0x01
    _distcp(d).write_bytes(bytes(data))


def edit_manifest(edit):
    def apply(d: Path):
        path = d / store.MANIFEST
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return apply


def set_first_file(key, value):
    def edit(m):
        m["files"][_distcp_name(m)][key] = value
        return m
    return edit_manifest(edit)


def _distcp_name(m: dict) -> str:
    return sorted(n for n in m["files"] if n.endswith(".distcp"))[0]


def copy_of_step_4(d: Path):
    shutil.rmtree(d)
    shutil.copytree(d.parent / STEP[4], d)


def newest(damage):
    return lambda root, monkeypatch: damage(root / STEP[6])


def undeletable_and_truncated(root: Path, monkeypatch):
    truncate(root / STEP[6])
    undeletable(monkeypatch, root / STEP[6])


def unmovable_and_truncated(root: Path, monkeypatch):
    truncate(root / STEP[6])
    rename = os.rename

    def refuse(src, dst):
        if Path(src).name == STEP[6]:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(src))
        return rename(src, dst)

    monkeypatch.setattr(os, "rename", refuse)


def added(name: str, make):
    return lambda root, monkeypatch: make(root / name, root)


# name: (damage(checkpoints dir, monkeypatch), extra overrides, resumed step, note naming the problem, entries after)
VARIANTS = {
    "truncated_file": (newest(truncate), [], 4, "bytes, the manifest says", MOVED_6),
    "missing_file": (newest(lambda d: (d / ".metadata").unlink()), [], 4, ".metadata is missing", MOVED_6),
    "flipped_byte": (newest(flip_byte), [], 4, "does not match its sha256", MOVED_6),
    "missing_manifest": (newest(lambda d: (d / store.MANIFEST).unlink()), [], 4, "no manifest.json", MOVED_6),
    "garbage_manifest": (newest(lambda d: (d / store.MANIFEST).write_bytes(b"\x00{garbage")), [], 4,
                         "unreadable manifest.json", MOVED_6),
    "manifest_files_empty": (newest(lambda d: (d / store.MANIFEST).write_text('{"files": {}}')), [], 4,
                             "manifest.json lists no files ('files' is {}", MOVED_6),
    "manifest_files_null": (newest(lambda d: (d / store.MANIFEST).write_text('{"files": null}')), [], 4,
                            "manifest.json lists no files ('files' is null", MOVED_6),
    "manifest_wrong_size": (newest(set_first_file("bytes", 12345)), [], 4, "bytes, the manifest says 12345",
                            MOVED_6),
    "manifest_wrong_sha": (newest(set_first_file("sha256", "ab" * 32)), [], 4, "does not match its sha256", MOVED_6),
    "manifest_wrong_step": (newest(copy_of_step_4), [], 4, "manifest.json says step 4, the directory name says 6",
                            MOVED_6),
    "extra_unknown_file": (newest(lambda d: (d / "notes.txt").write_text("not listed, not read")), [], 6, None,
                           [STEP[8], STEP[10]]),
    "empty_step_dir": (added(STEP[7], lambda d, root: d.mkdir()), [], 6, f"{STEP[7]}: no manifest.json",
                       [STEP[7], STEP[8], STEP[10]]),
    "stray_step_9999999_keep_last_1": (added(STEP[9999999], lambda d, root: d.mkdir()), ["checkpoint.keep_last=1"],
                                       6, f"{STEP[9999999]}: no manifest.json", [STEP[10], STEP[9999999]]),
    "non_numeric_backup": (added("step_0000006_backup", lambda d, root: shutil.copytree(root / STEP[6], d)), [], 6,
                           "step_0000006_backup: not named step_<7+ digits>",
                           ["step_0000006_backup", STEP[8], STEP[10]]),
    "undeletable_skipped_dir": (undeletable_and_truncated, [], 4, "bytes, the manifest says", MOVED_6),
    "unmovable_skipped_dir": (unmovable_and_truncated, [], 4, "bytes, the manifest says", [STEP[6], STEP[8], STEP[10]]),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_damaged_checkpoints_resume_from_the_newest_good_one_and_keep_retention_right(run, monkeypatch, variant):
    damage, extra, resumed_step, problem, after = VARIANTS[variant]
    damage(run / "checkpoints", monkeypatch)
    damaged_entries = {n: _tree(run / "checkpoints" / n) for n in names(run) if n not in verified(run)}
    trainer = Trainer(tiny_config(run, "train.max_steps=10", *RUN, *extra))
    assert trainer.step == resumed_step
    if problem is not None:
        assert any(problem in note for note in trainer.notes), trainer.notes
    assert trainer.fit()["steps"] == 10
    assert names(run) == after
    keep_last = 1 if "checkpoint.keep_last=1" in extra else 2
    assert verified(run) == [STEP[8], STEP[10]][-keep_last:]  # the newest verified ones, as many as kept
    log = (run / "log.txt").read_text()
    for name, tree in damaged_entries.items():  # left alone, or moved aside whole
        moved = run / "checkpoints" / (name if name in after else f".unusable_{name}")
        assert _tree(moved) == tree, name
        left = [line for line in log.splitlines() if "checkpoint pruning leaves" in line and name in line]
        assert len(left) == (1 if name in after else 0), left  # reported once (if still there at a save)
    if variant == "unmovable_skipped_dir":
        assert "checkpoint step 6 was not published" in log and "cannot be moved aside" in log
    elif resumed_step == 4:
        assert f"moved the unusable checkpoint {run / 'checkpoints' / STEP[6]}" in log


def _tree(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_all_checkpoints_corrupt_is_refused_unless_starting_fresh_is_asked_for(run):
    truncate(run / "checkpoints" / STEP[2])
    (run / "checkpoints" / STEP[4] / store.MANIFEST).write_text('{"files": null}')
    shutil.rmtree(run / "checkpoints" / STEP[6])
    (run / "checkpoints" / STEP[6]).mkdir()
    shutil.copytree(run / "checkpoints" / STEP[4], run / "checkpoints" / "step_0000004_backup")
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "log.txt", "config.yaml")}
    with pytest.raises(store.CheckpointError) as err:
        Trainer(tiny_config(run, "train.max_steps=10", *RUN))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"checkpoint.resume: {run / 'checkpoints'} holds 4 checkpoint "
                                                       "entries and none can be resumed from (")
    for part in (f"{STEP[6]}: no manifest.json", f"{STEP[4]}: manifest.json lists no files",
                 f"{STEP[2]}: __", "bytes, the manifest says", "step_0000004_backup: not named step_<7+ digits>",
                 "checkpoint.start_fresh_over_unusable=true"):
        assert part in message, part
    assert {name: (run / name).read_bytes() for name in before} == before  # metrics.jsonl never emptied
    bad = {n: _tree(run / "checkpoints" / n) for n in names(run)}

    trainer = Trainer(tiny_config(run, "train.max_steps=10", *RUN, "checkpoint.start_fresh_over_unusable=true"))
    assert trainer.step == 0 and trainer.resumed_from is None
    assert any("starting from scratch over 4 unusable checkpoint entries" in note for note in trainer.notes)
    trainer.fit()
    assert verified(run) == [STEP[8], STEP[10]]
    assert names(run) == [".unusable_step_0000002", ".unusable_step_0000004", ".unusable_step_0000006",
                          "step_0000004_backup", STEP[8], STEP[10]]
    for name, tree in bad.items():  # every bad entry kept whole (moved aside when its step was saved again)
        assert _tree(run / "checkpoints" / (name if name in names(run) else f".unusable_{name}")) == tree


# ----------------------------------------------------------------------------------------------- full disk
def _stop_at_the_step_after_the_failed_save(trainer) -> None:
    """Every step first lets the background save finish, so the next poll certainly sees how it ended."""
    step = trainer.train_step

    def after_the_save(batch):
        if trainer.checkpointer._pending is not None:
            trainer.checkpointer._pending.join()
        return step(batch)

    trainer.train_step = after_the_save


def test_full_disk_during_a_background_save_stops_the_run_at_the_next_step(run, monkeypatch):
    full_disk(monkeypatch, lambda writer: STEP[8] in str(writer.path))
    trainer = Trainer(tiny_config(run, "train.max_steps=10", *RUN))
    _stop_at_the_step_after_the_failed_save(trainer)
    where = re.escape(str(run / "checkpoints"))
    with pytest.raises(store.CheckpointError, match=rf"^checkpoint step 8 was not saved: no space left on device: "
                                                    rf"need ~[0-9.]+ MB in {where} \([0-9.]+ [GM]B free\); "):
        trainer.fit()
    assert trainer.step == 9  # found by the poll after step 9, not at the next save
    assert "checkpoint step 8 was not saved: no space left on device" in (run / "log.txt").read_text()
    assert names(run) == [STEP[2], STEP[4], STEP[6]] and verified(run) == names(run)  # the partial save removed
    monkeypatch.undo()
    resumed = Trainer(tiny_config(run, "train.max_steps=10", *RUN))
    assert resumed.step == 6 and resumed.fit()["steps"] == 10


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs mounted on ``tmp_path / "disk"`` (skipped where mounting is not allowed: not root, or a
    container without CAP_SYS_ADMIN)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True,
                             text=True) if shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (" + (mounted.stderr.strip() if mounted else "no mount command")
                    + "); the injected ENOSPC test covers the same path")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_full_disk_on_a_real_small_tmpfs(run, small_tmpfs):
    """checkpoints/ on an 8 MiB tmpfs; after step 7 a file fills it but 64 KiB, so step 8's save cannot be written."""
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(small_tmpfs)
    trainer = Trainer(tiny_config(run, "train.max_steps=10", *RUN))
    assert trainer.step == 0
    _stop_at_the_step_after_the_failed_save(trainer)
    step = trainer.train_step

    def fill_after_step_7(batch):
        out = step(batch)
        if trainer.step == 7:
            free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
            (small_tmpfs / "filler").write_bytes(b"\0" * (free - (64 << 10)))
        return out

    trainer.train_step = fill_after_step_7
    with pytest.raises(store.CheckpointError, match=r"^checkpoint step 8 was not saved: no space left on device: "
                                                    r"need ~1\.[0-9]+ MB in .*checkpoints \(0\.0[0-9] MB free\); "):
        trainer.fit()
    assert trainer.step == 9
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler", STEP[4], STEP[6]]
    assert verified(run) == [STEP[4], STEP[6]]
    (small_tmpfs / "filler").unlink()
    resumed = Trainer(tiny_config(run, "train.max_steps=10", *RUN))
    assert resumed.step == 6 and resumed.fit()["steps"] == 10 and verified(run) == [STEP[8], STEP[10]]
