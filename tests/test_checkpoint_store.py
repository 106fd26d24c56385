"""Checkpointer staging: a save copies the live tensors before it returns (training may change them at once),
reuses its host buffers save after save without mixing two saves up, and reports how long it blocked."""
import os

import pytest
import torch

from sfd_scale import checkpoint_store as store


def _read(directory, like: dict) -> dict:
    state = store.empty_like_stored(directory, list(like))
    store.load(directory, state)
    return state


def test_save_stages_live_tensors_and_reuses_buffers_across_saves(tmp_path):
    lines = []
    saver = store.Checkpointer(tmp_path, keep_last=5, asynchronous=True)
    saver.report = lines.append
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)  # a live parameter, passed without a copy
    first = saver.save(1, {"model/w": weight, "config": store.pack({"step": 1})}, {})
    weight.add_(100.0)  # the next optimizer step, while the first save still writes in the background
    second = saver.save(2, {"model/w": weight, "config": store.pack({"step": 2, "longer": "x" * 50})}, {})
    weight.mul_(-1.0)
    saver.wait()
    expected = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert torch.equal(_read(first, {"model/w": 0})["model/w"], expected)
    assert torch.equal(_read(second, {"model/w": 0})["model/w"], expected + 100.0)
    assert store.read_object(second, "config") == {"step": 2, "longer": "x" * 50}
    assert store.verify(first) is None and store.verify(second) is None
    timing = saver.last_save
    assert timing["step"] == 2 and timing["blocking_s"] >= timing["staging_s"] + timing["waited_s"] - 1e-9
    assert len(lines) == 2 and lines[1].startswith("checkpoint step 2: training blocked ")


def test_synchronous_save_reports_the_write_as_blocking(tmp_path):
    saver = store.Checkpointer(tmp_path, asynchronous=False)
    lines = []
    saver.report = lines.append
    path = saver.save(3, {"model/w": torch.ones(2)}, {})
    assert store.verify(path) is None and saver.stager is None
    assert "writing" in lines[0] and "background" not in lines[0] and saver.last_save["step"] == 3


# ----------------------------------------------------------------------------------------------- failed saves
def full_disk(monkeypatch, when=lambda writer: True) -> None:
    """DCP's file writer fails with ENOSPC (as on a full disk) for the checkpoints ``when`` picks."""
    import errno

    from torch.distributed.checkpoint import filesystem

    write_data = filesystem._FileSystemWriter.write_data

    def failing(self, plan, planner):
        if when(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path / "__0_0.distcp"))
        return write_data(self, plan, planner)

    monkeypatch.setattr(filesystem._FileSystemWriter, "write_data", failing)


def test_failed_background_save_is_raised_by_poll_in_one_line_and_cleaned_up(tmp_path, monkeypatch):
    saver = store.Checkpointer(tmp_path, keep_last=5, asynchronous=True)
    saver.save(1, {"w": torch.ones(1000)}, {})
    saver.wait()
    full_disk(monkeypatch, lambda writer: "step_0000002" in str(writer.path))
    saver.save(2, {"w": torch.ones(1000)}, {})
    saver._pending.join()  # the write has failed by now; only poll() may say so
    with pytest.raises(store.CheckpointError) as err:
        saver.poll()
    message = str(err.value)
    assert "\n" not in message and message.startswith("checkpoint step 2 was not saved: no space left on device: ")
    need = sum(f["bytes"] for f in store.manifest(store.checkpoint_dir(tmp_path, 1))["files"].values())  # > 4000
    assert f"need ~{need / 1e6:.2f} MB in {tmp_path / 'checkpoints'} (" in message
    assert " GB free); the partial save was removed, the earlier checkpoints are intact" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001"]
    assert store.verify(store.checkpoint_dir(tmp_path, 1)) is None
    saver.poll()  # reported once
    saver.wait()


def test_poll_does_not_wait_for_a_save_in_flight(tmp_path, monkeypatch):
    import threading

    release = threading.Event()
    publish = store.publish
    monkeypatch.setattr(store, "publish", lambda *a: release.wait() and publish(*a))
    saver = store.Checkpointer(tmp_path, asynchronous=True)
    saver.save(1, {"w": torch.ones(3)}, {})
    saver.poll()  # returns at once while the writer thread waits
    assert saver._pending.is_alive()
    release.set()
    saver.wait()
    assert store.verify(store.checkpoint_dir(tmp_path, 1)) is None


def test_failed_synchronous_save_names_the_cause(tmp_path, monkeypatch):
    import errno

    def refuse(*args, **kwargs):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), "/some/file")

    saver = store.Checkpointer(tmp_path, asynchronous=False)
    monkeypatch.setattr(store, "publish", refuse)
    with pytest.raises(store.CheckpointError, match=r"^checkpoint step 4 was not saved: Permission denied: /some/f"):
        saver.save(4, {"w": torch.ones(3)}, {})
    assert not list((tmp_path / "checkpoints").iterdir())
