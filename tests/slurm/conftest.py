"""The ``slurm`` fixture: a real one-node SLURM cluster for the session (``tests/slurm/cluster.py``).

Needs root and the Debian packages ``slurmctld slurmd slurm-client munge``. Without them the tests skip,
except under CI (``CI`` set to true / 1), where they must run and therefore fail.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from .cluster import LocalSlurm, missing_binaries

REPO = Path(__file__).resolve().parents[2]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm():
    missing = missing_binaries()
    why = (f"SLURM binaries missing: {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge)"
           if missing else None if os.geteuid() == 0 else "the local SLURM test cluster needs root")
    if why:
        if _in_ci():
            pytest.fail(f"{why}; CI must run tests/slurm")
        pytest.skip(why)
    cluster = LocalSlurm()
    # Jobs run `python` from PATH (sbatch exports the submitting environment): this interpreter, this
    # checkout, one BLAS thread per process (2-core machines; the same thread count in every run).
    cluster.env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{cluster.env.get('PATH', '')}",
                       PYTHONPATH=os.pathsep.join(p for p in (str(REPO), cluster.env.get("PYTHONPATH")) if p),
                       OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TMPDIR=str(cluster.root / "tmp"),
                       PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    (cluster.root / "tmp").mkdir()
    cluster.cwd = str(REPO)  # users submit from the repository root
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
