"""Fixtures of the data tests."""
from __future__ import annotations

import tempfile

import pytest


@pytest.fixture
def streaming_tmp(tmp_path, monkeypatch):
    """mosaicml-streaming puts file locks in $TMPDIR and state in /dev/shm: a private TMPDIR per test, and
    afterwards whatever dead processes (killed on purpose by some tests) left behind is reclaimed through the
    leases (``sfd_scale.data.streaming_cleanup``); live readers, e.g. of another test session, are left alone."""
    from sfd_scale.data.streaming_cleanup import reclaim_stale

    tmp = tmp_path / "streaming_tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield tmp
    reclaim_stale()
