"""Fixtures of the data tests."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def streaming_tmp(tmp_path, monkeypatch):  # tmp_path first: pytest fixes its base temp from $TMPDIR
    """mosaicml-streaming puts file locks in $TMPDIR and state in /dev/shm: a private TMPDIR per test, and
    afterwards whatever dead processes (killed on purpose by some tests) left behind is reclaimed through the
    leases (``sfd_scale.data.streaming_cleanup``); live readers, e.g. of another test session, are left alone."""
    from sfd_scale.data.streaming_cleanup import reclaim_stale

    # Short and outside tmp_path: loader workers hand tensors over through a Unix socket in $TMPDIR, whose
    # path must stay under ~108 bytes (pytest's tmp_path can exceed that).
    tmp = Path(tempfile.mkdtemp(prefix="sfd_", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield tmp
    reclaim_stale()
    shutil.rmtree(tmp, ignore_errors=True)
