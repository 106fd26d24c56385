"""What crosses between host and device around a training step, kept off the step's critical path.

* ``DevicePrefetcher``: the next batch is copied to the GPU on a side stream while the current step runs
  (pinned host memory -> ``non_blocking`` copies on a ``torch.cuda.Stream``; before a batch is used the
  compute stream waits for that copy and its tensors are marked as used there, ``record_stream``, so their
  memory is not reused early). Anywhere else it hands the batches through unchanged.
* ``StepWindow``: the engines return device tensors (loss, grad norm, non-finite flag); the trainer keeps them
  for the steps since the last read and reads them all at once (one ``.tolist()`` of a stacked tensor) at
  a log step, a checkpoint, or the end: no host sync in between. The read records of the steps since the
  last log step (the window means ``loss_avg``, ``loss_texture``, ... average) go into every checkpoint
  (``state`` / ``restore``): a run stopped between two log steps and resumed logs the same ``metrics.jsonl``
  lines as an uninterrupted one.
* ``WindowClock``: the wall-clock columns of a log line (images/s, TFLOP/s, MFU, peak memory, data-wait share),
  measured on the host between two log steps. Read right after the log step's settle, when the device has
  finished the window's steps, so no sync of its own; a resumed run's first window counts only its own steps.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional

import torch

from ..device import device_peak_tflops


# ----------------------------------------------------------------------------------------------- batches in
class DevicePrefetcher:
    """Iterate ``batches`` (dicts of tensors), each already on ``device`` when handed out."""

    def __init__(self, batches: Iterable[dict], device: torch.device):
        self.batches, self.device = batches, device

    def __iter__(self) -> Iterator[dict]:
        if self.device.type != "cuda":
            yield from self.batches  # the step's own .to(device) does the (synchronous) copy
            return
        stream = torch.cuda.Stream(self.device)
        staged: Optional[dict] = None
        for batch in self.batches:
            with torch.cuda.stream(stream):  # enqueue batch k+1's copy before batch k is handed out
                following = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                             for k, v in batch.items()}
            if staged is not None:
                yield self._ready(staged, stream)
            staged = following
        if staged is not None:
            yield self._ready(staged, stream)

    def _ready(self, batch: dict, stream) -> dict:
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(stream)
        for value in batch.values():
            if torch.is_tensor(value):
                value.record_stream(current)
        return batch


# ----------------------------------------------------------------------------------------------- metrics out
@dataclass
class StepRecord:
    """One step's metrics, read on the host; ``terms``: the logged loss terms (``loss_texture``, ...)."""

    step: int
    loss: float
    grad_norm: Optional[float]
    lr: float
    nonfinite: bool
    terms: Dict[str, float] = field(default_factory=dict)  # absent in checkpoints of older versions


class StepWindow:
    """Device metrics of the steps not yet read; ``settle`` reads them (one sync) into host records."""

    def __init__(self):
        self._device: List[tuple] = []  # (step, metrics dict of device tensors)
        self.records: List[StepRecord] = []  # read, not yet logged

    def add(self, step: int, metrics: Dict) -> None:
        self._device.append((step, metrics))

    def settle(self) -> List[StepRecord]:
        """Read every pending step (one host sync); returns the newly read records (also kept in ``records``)."""
        if not self._device:
            return []
        values = []
        for _, m in self._device:  # per step: loss, flag, grad norm (or the loss again), then its terms
            norm = m.get("grad_norm")
            values += [m["loss"], m["nonfinite"], norm if norm is not None else m["loss"], *m.get("terms", {}).values()]
        device = values[0].device
        read = torch.stack([v.detach().reshape(()).to(device, torch.float64) for v in values]).tolist()
        new, at = [], 0
        for step, m in self._device:
            names = list(m.get("terms", {}))
            loss, flag, norm = read[at:at + 3]
            new.append(StepRecord(step, loss, norm if m.get("grad_norm") is not None else None, m["lr"], flag > 0,
                                  dict(zip(names, read[at + 3:at + 3 + len(names)]))))
            at += 3 + len(names)
        self._device = []
        self.records += new
        return new

    def state(self) -> List[dict]:
        """The read, not yet logged records, as plain objects for a checkpoint (exact floats). Only between a
        ``settle`` and the next ``add``: a step not read yet could not be restored."""
        if self._device:
            raise RuntimeError(f"StepWindow.state with {len(self._device)} unread steps: settle the window first")
        return [asdict(r) for r in self.records]

    def restore(self, records: List[dict]) -> None:
        """Continue the window a checkpoint stored (``state``): the next log line averages over them too."""
        self._device, self.records = [], [StepRecord(**r) for r in records]

    def take(self) -> List[StepRecord]:
        """The settled records since the last ``take`` (for one log line)."""
        out, self.records = self.records, []
        return out


def log_line(records: List[StepRecord], skipped_total: int) -> dict:
    """The metrics.jsonl entry of a log step: the last step's loss / grad norm / LR, the mean loss of the
    window's finite steps (``loss_avg``) and the same window mean of each loss term (``loss_texture``, ...),
    and ``skipped_steps`` (the run's total) when the window skipped any."""
    last = records[-1]
    finite = [r for r in records if not r.nonfinite]
    line = {"loss": last.loss}
    if last.grad_norm is not None:
        line["grad_norm"] = last.grad_norm
    line["lr"] = last.lr
    line["loss_avg"] = _mean([r.loss for r in finite])
    for name in last.terms:
        line[name] = _mean([r.terms[name] for r in finite if name in r.terms])
    if any(r.nonfinite for r in records):
        line["skipped_steps"] = skipped_total
    return line


def _mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# ----------------------------------------------------------------------------------------------- rates
def throughput_columns(images: int, seconds: float, waited: float, flops_per_image: int, world_size: int,
                       peak_tflops: Optional[float]) -> dict:
    """``images_per_s`` (the whole run's), ``tflops_per_s`` (model FLOPs, ``models/flops.py``, per device:
    the run's over ``world_size``), ``mfu`` (that over the device's dense ``peak_tflops``, when known) and
    ``data_wait_frac`` (the share of ``seconds`` spent waiting for batches)."""
    seconds = max(seconds, 1e-9)
    images_per_s = images / seconds
    tflops = images_per_s * flops_per_image / world_size / 1e12
    line = {"images_per_s": images_per_s, "tflops_per_s": tflops}
    if peak_tflops:
        line["mfu"] = tflops / peak_tflops
    line["data_wait_frac"] = min(waited / seconds, 1.0)
    return line


class WindowClock:
    """Host wall time of the steps since the last log line and the part of it spent waiting for batches."""

    def __init__(self, step: int, global_batch_size: int, flops_per_image: int, world_size: int,
                 device: torch.device, precision: str):
        self.global_batch_size, self.flops_per_image, self.world_size = global_batch_size, flops_per_image, world_size
        self.device, self.peak = device, device_peak_tflops(device, precision)
        self._restart(step)

    def _restart(self, step: int) -> None:
        self.start, self.start_step, self.waited = time.perf_counter(), step, 0.0

    def timed(self, batches: Iterable[dict]) -> Iterator[dict]:
        """``batches`` as they are, the host time spent in each ``next`` counted as waiting (no device sync)."""
        iterator = iter(batches)
        while True:
            began = time.perf_counter()
            batch = next(iterator, None)
            self.waited += time.perf_counter() - began
            if batch is None:
                return
            yield batch

    def columns(self, step: int) -> dict:
        """The wall-clock columns of the window ending at ``step`` (call after the settle), then a new window.
        ``peak_mem_gb``: the process's peak of allocated CUDA memory so far (not on CPU)."""
        seconds = time.perf_counter() - self.start
        line = throughput_columns((step - self.start_step) * self.global_batch_size, seconds, self.waited,
                                  self.flops_per_image, self.world_size, self.peak)
        if self.device.type == "cuda":
            line["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        self._restart(step)
        return line
