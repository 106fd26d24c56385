"""Content checksums of latent shards (issue #16 case 9): recorded by the writer, checked on first read in the
background (the loader and the trainer stop with the damaged file's name), checked for a whole dataset by
``sfd verify-shards``; shards written before checksums still load, with one warning."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from sfd_scale.data import shard_check
from sfd_scale.data.shard_check import CHECKSUM, ShardCorruptError
from sfd_scale.data.shards import LatentShardDataset, Normalization
from sfd_scale.data.sources import Placement, ShardBatches
from tests.data.test_shards import write_toy_shards
from tools.verify_shards import main as verify_main

pytestmark = pytest.mark.usefixtures("streaming_tmp")


def _flip_byte(shard: Path, from_end: int = 3) -> None:
    """One bit of one sample's data changed (the last sample's last column: past the sample table, which the
    reader checks by itself)."""
    data = bytearray(shard.read_bytes())
    data[-from_end] ^= 0x01
    shard.write_bytes(bytes(data))


def _shard_of_sample(root: Path, index: int) -> Path:
    entries = shard_check.dataset_entries(root)
    sizes = [json.loads((root / "index.json").read_text())["shards"][i]["samples"] for i in range(len(entries))]
    for entry, size in zip(entries, sizes):
        if index < size:
            return Path(entry.path)
        index -= size
    raise IndexError(index)


def test_every_shard_carries_a_checksum_and_a_flipped_byte_is_named(tmp_path):
    root = tmp_path / "s"
    write_toy_shards(root, n=40, chunk=16)
    entries = shard_check.dataset_entries(root)
    assert len(entries) == 3 and all(e.digest == shard_check.file_digest(e.path) for e in entries)
    assert all(CHECKSUM in json.loads(p.read_text())["shards"][0]["raw_data"]["hashes"]
               for p in root.glob("part_*/index.json"))
    damaged = _shard_of_sample(root, 20)
    _flip_byte(damaged)
    ds = LatentShardDataset(root, batch_size=1, shuffle=False, norm=Normalization(False, False, 1.0))
    assert float(ds.read_batch([(0, False)])["latent"][0, 0, 0, 0]) == 0  # an intact shard reads
    with pytest.raises(ShardCorruptError, match=rf"latent shard {damaged} is damaged: content checksum .*"
                                                rf"delete its part directory {damaged.parent} and rerun"):
        ds.read_batch([(0, False), (20, False)])
    with pytest.raises(ShardCorruptError, match=str(damaged)):  # every later read of it, too
        ds.read_batch([(31, True)])


def test_the_loader_stops_with_the_damaged_shard_from_its_reader_threads(tmp_path):
    root = tmp_path / "s"
    write_toy_shards(root, n=40, chunk=16)
    damaged = _shard_of_sample(root, 39)
    _flip_byte(damaged)
    ds = LatentShardDataset(root, batch_size=8, seed=1, canonical_nodes=1)
    batches = iter(ShardBatches(ds, 0, Placement(global_batch=8, dp_rank=0, dp_size=1, num_workers=2)))
    with pytest.raises(ShardCorruptError, match=str(damaged)):
        for _ in range(5):  # one epoch reads every shard
            next(batches)
    batches.close()


def test_training_stops_with_the_damaged_shard(tmp_path):
    from sfd_scale.config import load_config
    from sfd_scale.train.trainer import Trainer

    root = tmp_path / "s"
    write_toy_shards(root, n=40, chunk=16)
    damaged = _shard_of_sample(root, 5)
    _flip_byte(damaged, from_end=40)
    cfg = load_config([], ["data.source=shards", f"data.path={root}", "data.canonical_nodes=1", "data.num_workers=2",
                           "sfd.texture_chans=4", "sfd.semantic_chans=2", "model.name=LightningDiT-S/1",
                           "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "model.input_size=2",
                           "model.num_classes=10", "train.global_batch_size=8", "train.max_steps=5",
                           f"train.output_dir={tmp_path / 'run'}", "train.device=cpu", "logging.wandb_mode=disabled",
                           "logging.progress=false", "parallel.engine=plain", "sample.grid_images=1"])
    with pytest.raises(ShardCorruptError, match=str(damaged)):
        Trainer(cfg).fit()  # one epoch (5 steps) reads every shard
    assert not (tmp_path / "run" / "checkpoints").is_dir() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_verify_command_reports_each_damaged_shard(tmp_path, capsys):
    root = tmp_path / "s"
    write_toy_shards(root, n=40, chunk=16)
    assert verify_main([str(root)]) == 0
    captured = capsys.readouterr()
    assert "3 shard files" in captured.out and captured.err == ""  # stderr is no terminal here: no bar
    assert verify_main([str(root), "--progress"]) == 0  # forced: the bar over the shard files
    assert "verify: 100%" in capsys.readouterr().err
    damaged = _shard_of_sample(root, 3)
    _flip_byte(damaged)
    truncated = _shard_of_sample(root, 35)
    truncated.write_bytes(truncated.read_bytes()[:-1])
    assert verify_main([str(root)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and err[-1] == f"2 of 3 shard files of {root} are damaged"
    assert err[0].startswith(f"latent shard {damaged} is damaged: content checksum")
    assert err[1].startswith(f"latent shard {truncated} is damaged: has ")
    assert verify_main([str(tmp_path / "nowhere")]) == 2
    assert "sfd_dataset.json" in capsys.readouterr().err


def test_shards_without_checksums_load_with_one_warning(tmp_path, capsys):
    """A dataset written before checksums (no ``hashes`` in its index.json) is read unverified, with one warning."""
    root = tmp_path / "s"
    write_toy_shards(root, n=40, chunk=16)
    index = json.loads((root / "index.json").read_text())
    for shard in index["shards"]:
        shard["raw_data"]["hashes"] = {}
    (root / "index.json").write_text(json.dumps(index))
    _flip_byte(_shard_of_sample(root, 20))  # not detectable without a checksum
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = LatentShardDataset(root, batch_size=1, shuffle=False)
        ds.read_batch([(0, False), (20, False)])
    unverified = [w for w in caught if "carry no content checksum" in str(w.message)]
    assert len(unverified) == 1 and "3 of 3 shard files" in str(unverified[0].message)
    assert verify_main([str(root)]) == 0
    assert "warning: 3 of 3 shard files" in capsys.readouterr().err


def test_remote_shards_are_checked_once_downloaded(tmp_path):
    """Streaming checks a hash only while downloading and then only logs a mismatch: the downloaded copy in the
    local cache is checked on its first read, as a local shard."""
    root = tmp_path / "remote"
    write_toy_shards(root, n=40, chunk=16)
    damaged = _shard_of_sample(root, 20)
    _flip_byte(damaged)
    ds = LatentShardDataset(tmp_path / "cache", remote=str(root), batch_size=8, shuffle=False)
    cached = tmp_path / "cache" / damaged.relative_to(root)
    with pytest.raises(ShardCorruptError, match=str(cached)):
        list(torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=ds.read_batch))
