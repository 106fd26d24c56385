"""Checkpointer staging: a save copies the live tensors before it returns (training may change them at once),
reuses its host buffers save after save without mixing two saves up, and reports how long it blocked."""
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
