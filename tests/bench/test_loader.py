"""The loader benchmark compares like with like: both readers hand out the same normalised samples."""
from __future__ import annotations

import torch

from sfd_scale.bench.loader import PerFileDataset, benchmark, write_both
from sfd_scale.data.shards import LatentShardDataset, flip_choice, read_stats


def test_both_loaders_return_the_same_samples(tmp_path, streaming_tmp):
    write_both(tmp_path, 12, feats=True, chunk=5)
    baseline = PerFileDataset(tmp_path / "files", read_stats(tmp_path / "shards"), feats=True)
    ours = LatentShardDataset(tmp_path / "shards", batch_size=4, shuffle=False, repa=True)
    for i in range(12):
        a, b = baseline[i], ours.read(i, flip_choice(0, 0, i))
        a["repa"] = a["repa"].float()  # read() hands out float32, like the official reader
        for key in ("latent", "label", "index", "repa"):
            assert torch.equal(a[key], b[key]), (i, key)
    rows = benchmark(tmp_path, 12, 4, 0, True, 2)
    assert [r.batches for r in rows] == [2, 2] and all(r.samples_per_s > 0 for r in rows)
    rows = benchmark(tmp_path, 12, 4, 1, True, 2)  # baseline, ours with a reader thread, ours in a worker process
    assert len(rows) == 3 and "threads" in rows[1].loader and "processes" in rows[2].loader
