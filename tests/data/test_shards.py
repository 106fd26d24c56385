"""Latent shards: official import is value-exact, the loader reproduces the official reader, statistics,
errors, and no streaming leftovers after a normal exit or a killed process group."""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sfd_scale.data import shards
from sfd_scale.data.official import OfficialLatentDataset, import_official
from sfd_scale.data.shards import LatentShardDataset, Normalization, PartWriter, ShardFormatError, finalize
from sfd_scale.streaming_leases import reclaim_stale

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("streaming_tmp")


def _open(root, **kw) -> LatentShardDataset:
    kw.setdefault("batch_size", 1)
    kw.setdefault("shuffle", False)
    return LatentShardDataset(root, **kw)


def _golden(golden_dir, name):
    return (json.loads((golden_dir / f"{name}.json").read_text()),
            load_file(str(golden_dir / f"{name}_outputs.safetensors")))


@pytest.mark.parametrize("name,folder", [("dataset", "latent_dataset"), ("dataset_repa", "latent_dataset_repa")])
def test_official_import_reproduces_the_official_reader(golden_dir, tmp_path, name, folder):
    spec, outputs = _golden(golden_dir, name)
    info = import_official(golden_dir / folder, tmp_path / "shards", progress=False)
    assert info["num_samples"] == spec["len"]
    repa = name == "dataset_repa"
    for r, read in enumerate(spec["reads"]):
        norm = Normalization(read["latent_norm"], read["latent_sv_norm"], read["latent_multiplier"])
        ds = _open(tmp_path / "shards", norm=norm, repa=repa)
        for index, flip in read["items"]:
            item = ds.read(index, flip)
            key = f"read{r}_idx{index}_{'flip' if flip else 'noflip'}"
            assert torch.equal(item["latent"], outputs[f"{key}_feature"]), key   # bit-exact
            assert item["label"].dtype == torch.int64 and int(item["label"]) == int(outputs[f"{key}_label"])
            assert int(item["index"]) == index
            if repa:
                assert torch.equal(item["repa"], outputs[f"{key}_feature_dino"]), key
        del ds


def test_import_copies_stats_and_is_resumable(golden_dir, tmp_path):
    src = golden_dir / "latent_dataset"
    out = tmp_path / "shards"
    import_official(src, out, progress=False)
    stats = load_file(str(out / shards.STATS_FILE))
    copy = load_file(str(golden_dir / "dataset_stats_copy.safetensors"))
    for key in ("latents_mean", "latents_std", "latents_sv_mean", "latents_sv_std"):
        assert torch.equal(stats[key], copy[key]), key
    # A rerun skips the finished parts: drop one, rerun, same dataset.
    before = (out / "index.json").read_text()
    shutil.rmtree(out / "part_0000001")
    import_official(src, out, progress=False)
    assert (out / "index.json").read_text() == before


def test_exact_stats_when_the_official_folder_has_none(golden_dir, tmp_path):
    src = tmp_path / "official"
    src.mkdir()
    for f in (golden_dir / "latent_dataset").glob("*.safetensors"):
        shutil.copy(f, src)
    info = import_official(src, tmp_path / "shards", progress=False)
    assert info["stats"] == "exact over all samples" and not list(src.glob("*_stats.pt"))  # source untouched
    reader = OfficialLatentDataset(src, latent_norm=False, latent_sv_norm=False)
    stats = load_file(str(tmp_path / "shards" / shards.STATS_FILE))
    for key in ("latents", "latents_sv"):
        every = torch.cat([reader.read(i, False)[0][None, :32] if key == "latents" else
                           reader.read(i, False)[0][None, 32:] for i in range(len(reader))]).double()
        torch.testing.assert_close(stats[f"{key}_mean"].double(), every.mean(dim=[0, 2, 3], keepdim=True),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(stats[f"{key}_std"].double(), every.std(dim=[0, 2, 3], keepdim=True),
                                   rtol=0, atol=1e-6)


def write_toy_shards(root, n=40, chunk=16, repa=False) -> None:
    """n samples whose texture latent is filled with their index (so a read names its sample)."""
    for k in range(0, n, chunk):
        with PartWriter(root, k // chunk) as w:
            for i in range(k, min(n, k + chunk)):
                s = {"latents": np.full((4, 2, 2), i, np.float32), "latents_flip": np.full((4, 2, 2), -i, np.float32),
                     "latents_sv": np.full((2, 2, 2), i, np.float16),
                     "latents_sv_flip": np.full((2, 2, 2), -i, np.float16), "label": i % 10}
                if repa:
                    s.update(feats_dino=np.full((3, 2, 2), i, np.float16),
                             feats_dino_flip=np.zeros((3, 2, 2), np.float16))
                w.write(s)
    finalize(root, {"source": "test"})


def test_flip_is_seeded_per_epoch_and_sample(tmp_path):
    write_toy_shards(tmp_path / "s")
    ds = _open(tmp_path / "s", norm=Normalization(False, False, 1.0), seed=3)
    for epoch in (0, 1):
        ds._epoch = epoch
        for i in (0, 7, 39):
            flip = shards.flip_choice(3, epoch, i)
            assert ds[i] == (i, flip)  # iteration yields keys; read_batch reads them
            assert float(ds.read_batch([ds[i]])["latent"][0, 0, 0, 0]) == (-i if flip else i)
    flips = [shards.flip_choice(3, 0, i) for i in range(400)]
    assert 150 < sum(flips) < 250 and flips != [shards.flip_choice(4, 0, i) for i in range(400)]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ShardFormatError, match="sfd_dataset.json"):
        _open(tmp_path / "nothing")
    write_toy_shards(tmp_path / "s")
    with pytest.raises(ShardFormatError, match="feats_dino"):
        _open(tmp_path / "s", repa=True)
    with pytest.raises(ShardFormatError, match="latents_sv_flip"):
        shards.column_encodings({"latents": np.zeros(2), "latents_flip": np.zeros(2), "latents_sv": np.zeros(2),
                                 "label": 1})
    with pytest.raises(ShardFormatError, match="no finished part"):
        finalize(tmp_path / "empty", {})


def test_failed_part_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with PartWriter(tmp_path / "s", 0) as w:
            w.write({"latents": np.zeros((1, 1, 1), np.float32), "latents_flip": np.zeros((1, 1, 1), np.float32),
                     "label": 0})
            raise RuntimeError("encoder crashed")
    assert shards.finished_parts(tmp_path / "s") == [] and not list((tmp_path / "s").iterdir())


def _leftovers(tmp: Path, prefix: int):
    tag = f"{prefix:06d}_"
    return sorted(str(p) for p in list(Path("/dev/shm").glob(tag + "*")) + list(tmp.glob(tag + "*")))


RUN = textwrap.dedent("""
    import sys, time, torch
    from sfd_scale.data.shards import LatentShardDataset, Normalization
    from sfd_scale.streaming_leases import StreamingLease
    lease = StreamingLease.acquire()
    ds = LatentShardDataset(sys.argv[1], batch_size=4, norm=Normalization(False, False, 1.0))
    lease.record(ds)
    it = iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, collate_fn=ds.read_batch))
    next(it)
    print(ds._shm_prefix_int, flush=True)
    if sys.argv[2] == "crash":
        time.sleep(60)
    assert sum(1 for _ in it) == 9
    lease.release(ds)
""")


def _start(root, mode):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(root), mode], stdout=subprocess.PIPE, env=env,
                            start_new_session=True, text=True)
    poll = select.poll()  # (select() refuses fds >= 1024; streaming keeps many shared-memory fds open)
    poll.register(proc.stdout, select.POLLIN)
    if not poll.poll(120_000):  # never hang the suite on a stuck child
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the loader subprocess printed nothing in 120 s")
    return proc, int(proc.stdout.readline())


def test_no_leftovers_after_normal_exit(tmp_path, streaming_tmp):
    write_toy_shards(tmp_path / "s")
    proc, prefix = _start(tmp_path / "s", "normal")
    assert proc.wait(timeout=60) == 0
    assert _leftovers(streaming_tmp, prefix) == []


def test_killed_process_group_is_reclaimed(tmp_path, streaming_tmp):
    write_toy_shards(tmp_path / "s")
    proc, prefix = _start(tmp_path / "s", "crash")
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: loader worker and resource tracker too
    proc.wait()
    time.sleep(0.5)
    assert _leftovers(streaming_tmp, prefix), "expected the killed run to leak (else this test proves nothing)"
    # the next run on this node reclaims them before opening its dataset ...
    removed = reclaim_stale()
    assert _leftovers(streaming_tmp, prefix) == [] and removed
    # ... and can open the same local directory again (a leaked 'locals' segment would refuse it)
    ds = _open(tmp_path / "s", norm=Normalization(False, False, 1.0))
    assert len(list(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ds.read_batch))) == 10


def test_local_reads_equal_streaming_reads(tmp_path):
    """Positional reads into the batch give exactly what streaming's own reader decodes, normalised by
    ``composite_latent``, for every sample and flip, in batches that span shards."""
    import pickle
    from streaming import StreamingDataset

    write_toy_shards(tmp_path / "s", n=40, chunk=16, repa=True)
    norm = Normalization(True, True, 0.5)
    ds, slow = (_open(tmp_path / "s", repa=True, norm=norm, fast_local_reads=fast) for fast in (True, False))
    keys = [(i, bool(i % 3)) for i in range(40)]
    keys = keys[::2] + keys[1::2]  # every batch mixes shards
    for b in range(0, 40, 8):
        batch, ref = ds.read_batch(keys[b:b + 8]), slow.read_batch(keys[b:b + 8])
        assert batch.keys() == ref.keys() and all(torch.equal(batch[k], ref[k]) for k in batch)
        assert batch["repa"].dtype == torch.float16 and batch["label"].dtype == torch.int64
        for j, (i, flip) in enumerate(keys[b:b + 8]):
            raw = {k: torch.from_numpy(np.array(v)) for k, v in StreamingDataset.get_item(ds, i).items()}
            sfx = "_flip" if flip else ""
            want = shards.composite_latent(raw["latents" + sfx][None], raw["latents_sv" + sfx][None], ds.stats,
                                           True, True, 0.5)[0]
            assert torch.equal(batch["latent"][j], want) and torch.equal(batch["repa"][j], raw["feats_dino" + sfx])
            assert int(batch["label"][j]) == int(raw["label"]) and int(batch["index"][j]) == i
    assert len(ds._files) == 3 and slow._files and all(f is None for f in slow._files.values())
    assert pickle.loads(pickle.dumps(ds))._files == {}
    shards.MAX_OPEN_SHARDS = 2  # the least recently used file is closed, reads stay right
    ds._files.clear()
    try:
        for i in (0, 20, 39, 0):
            assert torch.equal(ds.read_batch([(i, False)])["latent"], slow.read_batch([(i, False)])["latent"])
            assert len(ds._files) <= 2
    finally:
        shards.MAX_OPEN_SHARDS = 64


def test_remote_shards_are_read_when_iterated(tmp_path):
    """With a remote, the dataset's own files are fetched into the empty cache, each sample is read while
    streaming iterates (after its download, before any eviction) and rides along with its key; the batches
    equal those of the same shards read locally. A remote without the dataset is named in the error."""
    write_toy_shards(tmp_path / "remote", n=40, chunk=16, repa=True)
    cache = tmp_path / "cache"
    with pytest.raises(ShardFormatError, match="nowhere/stats.safetensors"):
        _open(cache, remote=str(tmp_path / "nowhere"))
    assert not cache.exists() or not list(cache.iterdir())  # nothing half-written
    remote = _open(cache, remote=str(tmp_path / "remote"), batch_size=8, repa=True)
    assert (cache / shards.META_FILE).is_file() and (cache / shards.STATS_FILE).is_file()
    local = _open(tmp_path / "remote", batch_size=8, repa=True)
    got, want = ([b for b in torch.utils.data.DataLoader(d, batch_size=8, collate_fn=d.read_batch)]
                 for d in (remote, local))
    assert len(got) == 5 and len(remote[0]) == 3  # (index, flip, the sample read)
    for a, b in zip(got, want):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(remote.read(7, True)[k], local.read(7, True)[k]) for k in ("latent", "repa"))


def test_a_truncated_shard_is_named(tmp_path):
    write_toy_shards(tmp_path / "s", n=16, chunk=16)
    shard = next((tmp_path / "s").glob("part_*/shard.*.mds"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    with pytest.raises(ShardFormatError, match=str(shard.name)):
        _open(tmp_path / "s").read_batch([(15, False)])


def test_a_zombie_owner_counts_as_dead():
    """A killed loader whose parent has not reaped it yet (or never will, without an init that reaps) must not
    keep its leaked segments alive."""
    from sfd_scale.streaming_leases import _start_time

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.time() < deadline
        time.sleep(0.05)
    assert _start_time(child.pid) is None and _start_time(os.getpid()) is not None
    child.wait()
