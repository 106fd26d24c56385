"""The ``slurm`` fixture: a real one-node SLURM cluster for the session, and ``slurm_nodes``: one of three
namespaced nodes (``tests/slurm/cluster.py``, ``tests/slurm/netns.py``).

Needs root and the Debian packages ``slurmctld slurmd slurm-client munge`` (``slurm_nodes`` also network
namespaces: iproute2, util-linux). Without them the tests skip, except under CI (``CI`` set to true / 1),
where they must run and therefore fail.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from . import netns
from .cluster import LocalSlurm, missing_binaries

REPO = Path(__file__).resolve().parents[2]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skip_unless_possible(nodes: int) -> None:
    missing = missing_binaries()
    why = (f"SLURM binaries missing: {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge)"
           if missing else None if os.geteuid() == 0 else "the local SLURM test cluster needs root")
    if why is None and nodes:
        why = netns.unavailable()
        why = why and f"no namespaced nodes for the multi-node cluster: {why}"
    if why:
        if _in_ci():
            pytest.fail(f"{why}; CI must run tests/slurm")
        pytest.skip(why)


def _cluster(nodes: int = 0, cpus: int = 0):
    _skip_unless_possible(nodes)
    cluster = LocalSlurm(cpus=cpus or None, nodes=nodes)
    # Jobs run `python` from PATH (sbatch exports the submitting environment): this interpreter, this
    # checkout, one BLAS thread per process (2-core machines; the same thread count in every run).
    cluster.env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{cluster.env.get('PATH', '')}",
                       PYTHONPATH=os.pathsep.join(p for p in (str(REPO), cluster.env.get("PYTHONPATH")) if p),
                       OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TMPDIR=str(cluster.tmp),
                       PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    cluster.cwd = str(REPO)  # users submit from the repository root
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm():
    yield from _cluster()


@pytest.fixture(scope="module")
def slurm_nodes():
    """Three nodes (``vnode1..3``) under one slurmctld, 4 CPUs each (this machine's cores, shared): room for a
    two-node job of 2 ranks per node and, beside it, a one-node job of 4 ranks."""
    yield from _cluster(nodes=3, cpus=4)
