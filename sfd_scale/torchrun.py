"""torchrun that keeps the trainer's exit status: ``python -m sfd_scale.torchrun <torchrun arguments>`` (also
``sfd torchrun ...``).

torchrun (``torch.distributed.run``) reports any failed worker as a ChildFailedError and exits 1, so a run that
stopped for a requeue (every worker exits 75, ``REQUEUE_EXIT``: checkpoint written on a signal or at
``train.time_budget_s``) looks like a crash to the script around it and is not requeued. This launcher runs
torchrun's own ``main`` with the same arguments and, when the workers stopped with one of our statuses (the first
to exit decides; the others exited the same or were stopped by torchrun), exits with it after one stderr line:

  75 (``REQUEUE_EXIT``)   every worker stopped for a requeue: run the same command again to continue;
  2  (``EXIT_USER_ERROR``) every worker refused a problem to fix, each having said which on stderr.

Any other failure (a crash, a kill, mixed statuses) keeps torchrun's report and status.
"""
from __future__ import annotations

import signal
import sys
from typing import Optional, Sequence

from .errors import EXIT_USER_ERROR
from .train.run_control import REQUEUE_EXIT

KEPT_STATUSES = {REQUEUE_EXIT: "stopped for a requeue (checkpoint written): run the same command again to continue",
                 EXIT_USER_ERROR: "refused to start or stopped on a problem to fix (see their error lines above)"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``torch.distributed.run`` with ``argv`` (default ``sys.argv[1:]``); its status, or 75 / 2 as above."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(list(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as err:
        status = kept_status(err)
        if status is None:
            raise
        print(f"sfd_scale.torchrun: workers exited {status}: {KEPT_STATUSES[status]}", file=sys.stderr, flush=True)
        return status
    return 0


def kept_status(err) -> Optional[int]:
    """The status of ``KEPT_STATUSES`` that the ChildFailedError ``err`` stands for, or None. The first worker to
    exit decides; torchrun then stops the others with SIGTERM, so the rest count as agreeing when they exited
    with the same status or died of that SIGTERM (in a requeue every rank has written its part of the
    checkpoint before any rank exits: the save is collective)."""
    _, first = err.get_first_failure()
    others = {failure.exitcode for failure in err.failures.values()}
    if first.exitcode in KEPT_STATUSES and others <= {first.exitcode, -signal.SIGTERM}:
        return first.exitcode
    return None


if __name__ == "__main__":
    sys.exit(main())
