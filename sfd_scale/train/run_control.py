"""When a run stops before ``train.max_steps``: requeue signals, the wall-clock budget and the non-finite-step
limit, decided the same way on every rank.

Signals (``train.requeue_signals``, e.g. SLURM's warning signal before a preemption) are only noted: the step
in progress finishes, a checkpoint is written and the process exits with ``REQUEUE_EXIT``, which the
``slurm/`` launchers turn into a requeue. Ranks agree over a CPU (gloo) group of their own every
``train.stop_check_every`` steps and at every checkpoint step, so no rank stops alone and no step waits on
the host otherwise. A step whose loss or grad norm was non-finite changed nothing (the engines skip it on the
device); it is counted when the trainer reads its metrics, and ``train.max_nonfinite_steps`` of them stop the
run with a checkpoint and an error.
"""
from __future__ import annotations

import contextlib
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import UserError
from ..logging import RunLogger
from .step_io import StepWindow

REQUEUE_EXIT = 75  # EX_TEMPFAIL ("try again later"): checkpoint written on a signal or at the time budget;
                   # slurm/common.sh requeues the job when the training step exits with it


class NonFiniteError(UserError, FloatingPointError):
    """``train.max_nonfinite_steps`` steps were skipped; raised after the run's checkpoint is written, so the
    tool exits with status 2 and the run can continue from it once the cause is fixed (the count is part of the
    checkpoint: continuing needs a higher limit)."""


class RunControl:
    """Stop requests and the non-finite policy of one run (``train`` settings: ``cfg.train``)."""

    def __init__(self, train_cfg, rank: int, world_size: int):
        self.cfg, self.rank = train_cfg, rank
        # agreed over a CPU group of their own: no device sync, whatever the training backend
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None
        self.signal_name: Optional[str] = None
        self.started = time.monotonic()

    def on_signal(self, signum, frame) -> None:  # only notes it: the step in progress finishes first
        self.signal_name = signal.Signals(signum).name

    @contextlib.contextmanager
    def handling_signals(self):
        """``on_signal`` handles ``train.requeue_signals`` inside; the previous handlers are restored after.
        The wall-clock budget counts from here."""
        handlers = {name: signal.signal(getattr(signal, name), self.on_signal) for name in self.cfg.requeue_signals}
        self.started = time.monotonic()
        try:
            yield self
        finally:
            for name, handler in handlers.items():
                signal.signal(getattr(signal, name), handler)

    def stop_reason(self, step: int, agree: bool = False) -> Optional[str]:
        """Why every rank stops after ``step`` (a signal reached any rank, or rank 0's wall-clock budget ran
        out), or None. One process decides every step; several agree (a gloo all-reduce, collective) every
        ``train.stop_check_every`` steps and whenever ``agree`` (checkpoint steps); otherwise None."""
        budget = self.cfg.time_budget_s
        if self.group is not None and not agree and step % self.cfg.stop_check_every:
            return None
        flags = torch.tensor([self.signal_name is not None,
                              self.rank == 0 and budget > 0 and time.monotonic() - self.started >= budget],
                             dtype=torch.int32)
        if self.group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        if flags[0]:
            return f"signal {self.signal_name or 'received by another rank'}"
        if flags[1]:
            return f"train.time_budget_s={budget:g} reached"
        return None

    # ------------------------------------------------------------------------------------------ non-finite
    def settle(self, window: StepWindow, logger: RunLogger, step: int, skipped: int) -> int:
        """Read the window's pending device metrics (one host sync), report each skipped step; returns the
        run's count of skipped steps, ``skipped`` plus the new ones."""
        for record in window.settle():
            if record.nonfinite:
                skipped += 1
                logger.write(f"step {record.step}: skipped, no update (non-finite loss or grad norm, seen at step "
                             f"{step}); {skipped} of train.max_nonfinite_steps={self.cfg.max_nonfinite_steps}")
        return skipped

    def nonfinite_limit_reached(self, skipped: int) -> bool:
        return skipped >= self.cfg.max_nonfinite_steps

    def nonfinite_error(self, skipped: int, step: int, output_dir) -> NonFiniteError:
        return NonFiniteError(f"{skipped} steps had a non-finite loss or grad norm "
                              f"(train.max_nonfinite_steps={self.cfg.max_nonfinite_steps}); stopped at step {step} "
                              f"with a checkpoint in {output_dir} (log.txt names the skipped steps); to continue "
                              f"from it, remove the cause (e.g. lower optim.lr, set optim.grad_clip) and raise "
                              f"train.max_nonfinite_steps above {skipped}")
