"""Host <-> device traffic around a step: metrics read once per window, batches handed through on CPU, the
EMA skipping a flagged step on the device."""
import math

import pytest
import torch
import torch.nn as nn

from sfd_scale.train.ema import EMA
from sfd_scale.train.step_io import DevicePrefetcher, StepWindow, log_line


def _metrics(loss, nonfinite=0.0, grad_norm=None, lr=1e-3):
    m = {"loss": torch.tensor(loss, dtype=torch.float64), "nonfinite": torch.tensor(nonfinite), "lr": lr}
    m["grad_norm"] = None if grad_norm is None else torch.tensor(grad_norm)
    return m


def test_window_reads_all_pending_steps_at_once_and_names_the_skipped_ones():
    window = StepWindow()
    window.add(1, _metrics(2.0, grad_norm=0.5))
    window.add(2, _metrics(math.nan, 1.0, grad_norm=math.inf))
    new = window.settle()
    assert [(r.step, r.nonfinite) for r in new] == [(1, False), (2, True)] and window.settle() == []
    window.add(3, _metrics(1.0, grad_norm=0.25, lr=2e-3))
    window.settle()
    records = window.take()
    assert [r.step for r in records] == [1, 2, 3] and window.take() == []
    line = log_line(records, skipped_total=1)
    assert line == {"loss": 1.0, "grad_norm": 0.25, "lr": 2e-3, "loss_avg": 1.5, "skipped_steps": 1}
    assert list(line)[:4] == ["loss", "grad_norm", "lr", "loss_avg"]  # metrics.jsonl's order


def test_window_without_grad_norm_and_all_skipped():
    window = StepWindow()
    window.add(5, _metrics(math.nan, 1.0))
    window.settle()
    line = log_line(window.take(), skipped_total=3)
    assert math.isnan(line["loss"]) and math.isnan(line["loss_avg"]) and "grad_norm" not in line
    assert line["skipped_steps"] == 3


def test_window_state_carries_the_unlogged_steps_into_a_new_window():
    window = StepWindow()
    window.add(1, _metrics(2.0, grad_norm=0.5))
    with pytest.raises(RuntimeError, match="1 unread steps"):
        window.state()  # a checkpoint of a step not read yet could not be restored
    window.settle()
    resumed = StepWindow()
    resumed.restore(window.state())
    resumed.add(2, _metrics(1.0, grad_norm=0.25))
    resumed.settle()
    window.add(2, _metrics(1.0, grad_norm=0.25))
    window.settle()
    assert log_line(resumed.take(), 0) == log_line(window.take(), 0) == \
        {"loss": 1.0, "grad_norm": 0.25, "lr": 1e-3, "loss_avg": 1.5}


def test_prefetcher_hands_cpu_batches_through():
    batches = [{"latent": torch.full((2,), float(i)), "index": torch.arange(2) + i} for i in range(3)]
    out = list(DevicePrefetcher(iter(batches), torch.device("cpu")))
    assert len(out) == 3 and all(a is b for a, b in zip(out, batches))


def test_ema_skip_flag_leaves_it_unchanged_and_sources_replace_the_params():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    start = [p.detach().clone() for p in ema.model.parameters()]
    masters = [torch.ones_like(p) for p in model.parameters()]
    ema.update(masters, skip=torch.tensor(1.0))
    assert all(torch.equal(e, s) for e, s in zip(ema.model.parameters(), start))
    ema.update(masters, skip=torch.tensor(0.0))
    assert all(torch.allclose(e, 0.5 * s + 0.5, atol=1e-7) for e, s in zip(ema.model.parameters(), start))
    # bf16 sources are cast; the flag-free call is the plain rule on the module's own parameters
    ema.update([m.bfloat16() for m in masters], skip=torch.tensor(0.0))
    assert all(torch.allclose(e, 0.25 * s + 0.75, atol=1e-7) for e, s in zip(ema.model.parameters(), start))
