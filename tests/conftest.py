"""Shared fixtures. Golden parity tests read ../shared/golden/ and fail (never skip) without it."""
from __future__ import annotations

import os
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
