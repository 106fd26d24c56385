"""What crosses between host and device around a training step, kept off the step's critical path.

* ``DevicePrefetcher``: the next batch is copied to the GPU on a side stream while the current step runs
  (pinned host memory -> ``non_blocking`` copies on a ``torch.cuda.Stream``; before a batch is used the
  compute stream waits for that copy and its tensors are marked as used there, ``record_stream``, so their
  memory is not reused early). Anywhere else it hands the batches through unchanged.
* ``StepWindow``: the engines return device tensors (loss, grad norm, non-finite flag); the trainer keeps them
  for the steps since the last read and reads them all at once (one ``.tolist()`` of a stacked tensor) at
  a log step, a checkpoint, or the end: no host sync in between. The read records of the steps since the
  last log step (the window ``loss_avg`` averages) go into every checkpoint (``state`` / ``restore``): a run
  stopped between two log steps and resumed logs the same ``metrics.jsonl`` lines as an uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, Iterator, List, Optional

import torch


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
    """One step's metrics, read on the host."""

    step: int
    loss: float
    grad_norm: Optional[float]
    lr: float
    nonfinite: bool


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
        for _, m in self._device:
            norm = m.get("grad_norm")
            values += [m["loss"], m["nonfinite"], norm if norm is not None else m["loss"]]
        device = values[0].device
        read = torch.stack([v.detach().reshape(()).to(device, torch.float64) for v in values]).tolist()
        new = [StepRecord(step, read[3 * i], read[3 * i + 2] if m.get("grad_norm") is not None else None,
                          m["lr"], read[3 * i + 1] > 0) for i, (step, m) in enumerate(self._device)]
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
    window's finite steps (``loss_avg``), and ``skipped_steps`` (the run's total) when the window skipped any."""
    last = records[-1]
    finite = [r.loss for r in records if not r.nonfinite]
    line = {"loss": last.loss}
    if last.grad_norm is not None:
        line["grad_norm"] = last.grad_norm
    line["lr"] = last.lr
    line["loss_avg"] = sum(finite) / len(finite) if finite else math.nan
    if any(r.nonfinite for r in records):
        line["skipped_steps"] = skipped_total
    return line
