"""Host <-> device traffic around a step: metrics read once per window, batches handed through on CPU, the
EMA skipping a flagged step on the device."""
import math

import pytest
import torch
import torch.nn as nn

from sfd_scale.train.ema import EMA
from sfd_scale.train.step_io import DevicePrefetcher, StepWindow, WindowClock, log_line, throughput_columns


def _metrics(loss, nonfinite=0.0, grad_norm=None, lr=1e-3, **terms):
    m = {"loss": torch.tensor(loss, dtype=torch.float64), "nonfinite": torch.tensor(nonfinite), "lr": lr}
    m["grad_norm"] = None if grad_norm is None else torch.tensor(grad_norm)
    m["terms"] = {k: torch.tensor(v, dtype=torch.float64) for k, v in terms.items()}
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


def test_loss_terms_are_window_means_of_the_finite_steps_and_survive_a_checkpoint():
    window = StepWindow()
    window.add(1, _metrics(2.0, loss_texture=1.0, loss_cos=0.5))
    window.add(2, _metrics(math.nan, 1.0, loss_texture=9.0, loss_cos=9.0))  # skipped: not averaged
    window.settle()
    assert window.records[0].terms == {"loss_texture": 1.0, "loss_cos": 0.5}
    resumed = StepWindow()
    resumed.restore(window.state())
    for w in (window, resumed):
        w.add(3, _metrics(1.0, loss_texture=2.0, loss_cos=0.25))
        w.settle()
    line = log_line(resumed.take(), 1)
    assert line == log_line(window.take(), 1)
    assert line == {"loss": 1.0, "lr": 1e-3, "loss_avg": 1.5, "loss_texture": 1.5, "loss_cos": 0.375,
                    "skipped_steps": 1}
    old = StepWindow()  # a checkpoint of an older version: records without terms
    old.restore([{"step": 1, "loss": 2.0, "grad_norm": None, "lr": 1e-3, "nonfinite": False}])
    assert old.records[0].terms == {}


def test_throughput_columns_arithmetic():
    # 64 images in 2 s, 0.5 s of it waiting; 5e11 FLOPs per image over 4 devices of an 8 TFLOP/s peak
    line = throughput_columns(64, 2.0, 0.5, int(5e11), 4, 8.0)
    assert line == {"images_per_s": 32.0, "tflops_per_s": 4.0, "mfu": 0.5, "data_wait_frac": 0.25}
    assert "mfu" not in throughput_columns(64, 2.0, 0.5, int(5e11), 4, None)  # unknown peak (CPU)
    clock = WindowClock(10, 8, int(1e12), 1, torch.device("cpu"), "fp32")
    assert clock.peak is None and list(clock.timed(iter([{"a": 1}, {"a": 2}]))) == [{"a": 1}, {"a": 2}]
    columns = clock.columns(12)  # 2 steps of 8 images
    assert set(columns) == {"images_per_s", "tflops_per_s", "data_wait_frac"} and columns["images_per_s"] > 0
    assert clock.start_step == 12 and clock.waited == 0.0  # a new window


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
