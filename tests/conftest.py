"""Shared fixtures. Golden parity tests read ../shared/golden/ and fail (never skip) without it."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN_ROOT = Path(os.environ.get("SFD_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The official golden set A (``shared/golden/sfd_official``). Missing files are a test failure."""
    path = GOLDEN_ROOT / "sfd_official"
    if not (path / "config.json").is_file():
        pytest.fail(f"golden files not found at {path} (set SFD_GOLDEN_DIR to the folder holding sfd_official/)")
    return path


@pytest.fixture
def single_thread():
    """The golden sets were produced with torch.set_num_threads(1). Multi-threaded BLAS sums in another
    order (~1e-7 differences) which the adaptive dopri5 solver amplifies across phase switches; one
    thread reproduces the official numbers bit for bit."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


OFFICIAL_CODE = Path(os.environ.get("SFD_OFFICIAL_CODE", REPO.parent / "shared" / "reference" / "sfd-official-cde82a6"))


@pytest.fixture(scope="session")
def official_code() -> Path:
    """The official SFD code (``shared/reference/sfd-official-cde82a6``), imported from its path by the
    baseline benchmark. Missing is a test failure, as for the golden files."""
    if not (OFFICIAL_CODE / "models" / "lightningdit.py").is_file():
        pytest.fail(f"official code not found at {OFFICIAL_CODE} (set SFD_OFFICIAL_CODE to its directory)")
    return OFFICIAL_CODE


@pytest.fixture
def streaming_tmp(tmp_path, monkeypatch):  # tmp_path first: pytest fixes its base temp from $TMPDIR
    """mosaicml-streaming puts file locks in $TMPDIR and state in /dev/shm: a private TMPDIR per test, and
    afterwards whatever dead processes (killed on purpose by some tests) left behind is reclaimed through the
    leases (``sfd_scale.streaming_leases``); live readers, e.g. of another test session, are left alone."""
    from sfd_scale.streaming_leases import reclaim_stale

    # Short and outside tmp_path: loader workers hand tensors over through a Unix socket in $TMPDIR, whose
    # path must stay under ~108 bytes (pytest's tmp_path can exceed that).
    tmp = Path(tempfile.mkdtemp(prefix="sfd_", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield tmp
    reclaim_stale()
    shutil.rmtree(tmp, ignore_errors=True)
