"""Training data for the trainer: which latents, in what order, and how to look at samples.

Four sources (``data.source``): ``shards`` (sfd_scale latent shards read with mosaicml-streaming, the
one for real runs), ``official`` (the official safetensors latent folder, read in place), ``demo``
(scikit-learn digits) and ``synthetic`` (random tensors of the model's shapes, for benchmarks and the
cost model: the training step without any storage). Each yields this rank's share of every global batch as a dict
``{"latent", "label", "index"[, "repa"]}`` and can start at any training step: the batches of step k
depend only on (train.seed, k) and, for shards, ``data.canonical_nodes`` — not on the number of ranks,
workers or restarts. ``index`` is the sample's dataset index; the trainer keys each sample's random
draws by it.
"""
from __future__ import annotations

import itertools
import json
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .decoding import LatentStats, TextureDecoder, official_latent_stats, shard_latent_stats, stats_file_latent_stats
from .demo import build_demo_latents, images_to_uint8
from .official import OfficialLatentDataset
from .images import DALI_MISSING
from .online_repa import OnlineRepa, dataset_dino
from .shards import (INDEX_FILE, LatentShardDataset, Normalization, ShardFormatError, fetch_dataset_files,
                     latent_channels, read_meta, require_images)
from ..errors import one_line
from ..config import ConfigError, require_package
from ..streaming_leases import StreamingLease


@dataclass
class Placement:
    """Where this process sits: its data-parallel share and the ranks that must see the same samples."""
    global_batch: int
    dp_rank: int = 0
    dp_size: int = 1
    replication: int = 1            # consecutive ranks reading the same samples (tensor x pipeline group)
    num_workers: int = 0
    pin_memory: bool = False
    device: str = "cpu"             # the training device: where online REPA targets are computed

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.dp_size


@dataclass
class TrainingData:
    channels: int
    num_classes: Optional[int]
    # latents -> uint8 (B, H, W, C) images: the demo's own decoder, the texture VAE (``sample.texture_vae``) on
    # shards / official latents; None without one (grids then show a false-colour view of latent channels)
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]]
    description: str
    has_repa_features: bool
    batches: Callable[[int, Placement], Iterable[dict]]      # (start step, placement) -> this rank's batches
    close: Callable[[], None] = field(default=lambda: None)
    # the training images themselves, uint8 (N, H, W, 3), where the source has them (the demo's digits): the
    # FID reference of ``eval.fid_reference=demo`` (trainer and studies), never rebuilt elsewhere
    reference_images: Optional[Callable[[], np.ndarray]] = None
    # the normalisation the latents were given (shards / official): stored with every checkpoint, so that
    # sampling it can decode without the dataset (``data/decoding.py``)
    latent_stats: Optional[LatentStats] = None


# ------------------------------------------------------------------------------------------ map-style
class _IndexFlipView(Dataset):
    """Reads sample ``index`` with the flip chosen by the sampler (not by a hidden RNG)."""

    def __init__(self, read: Callable, length: int):
        self._read, self._len = read, length

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key: Tuple[int, bool]) -> dict:
        index, flip = key
        out = self._read(index, flip)
        item = {"latent": out[0], "label": out[1], "index": torch.tensor(index, dtype=torch.int64)}
        if len(out) > 2:
            item["repa"] = out[2]
        return item


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore the signals a scheduler sends the whole job before preempting it (SIGUSR1,
    SIGTERM): the training process handles them (save, then exit), and a worker killed by one would fail
    the step in progress. Workers still end with their parent."""
    import signal

    for name in ("SIGUSR1", "SIGTERM"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class ResumableBatchSampler:
    """Endless batches of (index, flip): a fresh permutation per epoch from (seed, epoch).

    Batch k is a pure function of (seed, k), so resuming needs no sampler state: start at the number of
    batches already consumed (the training step). DataLoader prefetching therefore cannot skew a resume.
    Batches never straddle epochs (each epoch's tail is dropped). With several data-parallel ranks each
    rank gets its contiguous share of the same global batch.
    """

    def __init__(self, length: int, batch_size: int, seed: int, hflip: bool, start_batch: int = 0,
                 dp_rank: int = 0, dp_size: int = 1):
        if batch_size > length:
            raise ValueError(f"train.global_batch_size ({batch_size}) exceeds the dataset size ({length})")
        if batch_size % dp_size:
            raise ValueError(f"train.global_batch_size ({batch_size}) is not divisible by the data-parallel size "
                             f"({dp_size})")
        self.length, self.batch_size, self.seed, self.hflip = length, batch_size, seed, hflip
        self.batches_per_epoch = length // batch_size
        self.start_batch = start_batch
        per_rank = batch_size // dp_size  # each data-parallel rank reads its contiguous share
        self.share = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)

    def epoch_order(self, epoch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.length, generator=g)
        flips = torch.rand(self.length, generator=g) < 0.5
        return order, flips & self.hflip

    def __iter__(self) -> Iterator[List[Tuple[int, bool]]]:
        epoch, batch = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            order, flips = self.epoch_order(epoch)
            for b in range(batch, self.batches_per_epoch):
                sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
                yield list(zip(order[sl].tolist(), flips[sl].tolist()))[self.share]
            epoch, batch = epoch + 1, 0


def _map_style_batches(view: Dataset, seed: int, hflip: bool):
    def batches(start_step: int, where: Placement) -> Iterable[dict]:
        sampler = ResumableBatchSampler(len(view), where.global_batch, seed, hflip, start_batch=start_step,
                                        dp_rank=where.dp_rank, dp_size=where.dp_size)
        return DataLoader(view, batch_sampler=sampler, num_workers=where.num_workers, pin_memory=where.pin_memory,
                          persistent_workers=where.num_workers > 0, worker_init_fn=ignore_stop_signals)
    return batches


# ------------------------------------------------------------------------------------------ shards
class ShardBatches:
    """This rank's batches from a ``LatentShardDataset``, from training step ``start_step`` on.

    An epoch is ``epoch_size // global_batch`` steps (the tail is dropped, as with the map-style sources);
    step k is (epoch, sample) = divmod(k, steps_per_epoch) * global batch, handed to streaming as its resume
    state before each epoch, so a restart at step k reads exactly the remaining samples.

    Who reads (``num_workers`` readers): local shards are read by threads of this process (with 0, by the
    consuming thread; streaming's order is walked ahead in a thread either way). The reads are positional file
    reads that release the GIL, and a batch lands in this process's memory directly; worker processes would
    hand every batch over through a fresh shared-memory segment (~20 ms per 25 MB batch with REPA features on
    the benchmark machine, more than reading it; ``benchmarks/loader_cpu.md``). Remote shards are read by
    DataLoader worker processes, which is where streaming downloads them.
    """

    def __init__(self, dataset: LatentShardDataset, start_step: int, where: Placement,
                 reader_threads: Optional[bool] = None):
        self.ds, self.start, self.where = dataset, start_step, where
        self.threads = dataset.remote is None if reader_threads is None else reader_threads
        self.steps_per_epoch = dataset.epoch_size // where.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"train.global_batch_size ({where.global_batch}) exceeds the dataset size "
                             f"({dataset.epoch_size})")

    def _epochs(self, loader: DataLoader, gate: Optional["_EpochGate"] = None) -> Iterator:
        """``loader``'s batches, epoch after epoch, from the start step on; each epoch after the first only
        once ``gate`` lets it start."""
        step = self.start
        while True:
            if step != self.start and gate is not None and not gate.next_epoch_wanted():
                return
            epoch, b = divmod(step, self.steps_per_epoch)
            self.ds.load_state_dict({"epoch": epoch, "sample_in_epoch": b * self.where.global_batch,
                                     "num_canonical_nodes": self.ds.num_canonical_nodes,
                                     "shuffle_seed": self.ds.shuffle_seed, "initial_physical_nodes": None})
            for batch in loader:
                yield batch
                step += 1
                if step % self.steps_per_epoch == 0:
                    break

    def __iter__(self) -> Iterator[dict]:
        n, pin = self.where.num_workers, self.where.pin_memory
        if not self.threads:
            # One loader for the whole run: its workers persist across epochs (restarting them every epoch cost
            # more than the reads on short epochs). Streaming keeps the resume state set in ``_epochs`` in
            # shared memory, where every worker reads it when the next epoch's iteration starts.
            yield from self._epochs(DataLoader(self.ds, batch_size=self.where.per_rank, num_workers=n,
                                               pin_memory=pin, drop_last=True, collate_fn=self.ds.read_batch,
                                               persistent_workers=n > 0, worker_init_fn=ignore_stop_signals))
            return
        gate = _EpochGate()
        keys = self._epochs(DataLoader(self.ds, batch_size=self.where.per_rank, num_workers=0, drop_last=True,
                                       collate_fn=list), gate)

        def read(batch_keys: list) -> dict:
            batch = self.ds.read_batch(batch_keys)
            return {k: v.pin_memory() for k, v in batch.items()} if pin else batch

        yield from _read_ahead(keys, read, n, gate)


class _EpochGate:
    """Holds a producer running ahead at each epoch end until its consumer asks for the next epoch's first batch.

    Streaming makes the ranks of a node meet at a barrier when an epoch starts. A producer that entered the next
    epoch while its consumer was done (a run stopping at an epoch end) would wait there for the other ranks
    forever; the trainer asks for one more batch before it sees ``train.max_steps``, on every rank alike."""

    def __init__(self):
        self.cond = threading.Condition()
        self.produced = self.requested = 0  # batches handed to the readers / asked for by the consumer
        self.stopped = False

    def next_epoch_wanted(self) -> bool:  # producer thread
        with self.cond:
            self.cond.wait_for(lambda: self.stopped or self.requested > self.produced)
            return not self.stopped

    def count(self, attr: str) -> None:
        with self.cond:
            setattr(self, attr, getattr(self, attr) + 1)
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


def _read_ahead(keys: Iterator, read: Callable, readers: int, gate: _EpochGate) -> Iterator:
    """``map(read, keys)``, in order, with ``readers`` threads a few batches ahead of the consumer (with none,
    the consumer reads).

    A producer thread walks ``keys`` (streaming's iteration: ~1 ms per batch of Python, and a ~20 ms sleep-poll
    at each epoch start while its ready thread catches up) and hands each batch of keys to the reader pool, so
    neither cost lands on the training loop's thread."""
    pool = ThreadPoolExecutor(readers, thread_name_prefix="sfd-shard-reader") if readers else None
    ahead: "queue.Queue" = queue.Queue(maxsize=max(2 * readers, 2))  # futures of batches (or keys), in order

    def put(item) -> bool:
        while not gate.stopped:
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for batch_keys in keys:
                gate.count("produced")
                if not put(pool.submit(read, batch_keys) if pool else batch_keys):
                    return
        except BaseException as err:  # raised in the consumer's thread
            put(err)

    producer = threading.Thread(target=produce, name="sfd-shard-keys", daemon=True)
    producer.start()
    try:
        while True:
            gate.count("requested")
            item = ahead.get()
            if isinstance(item, BaseException):
                raise item
            yield item.result() if pool else read(item)
    finally:
        gate.stop()
        producer.join()
        keys.close()  # ends streaming's iteration (only now: a generator cannot be closed while another thread runs it)
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)


def check_local_shards(root) -> None:
    """Every shard file that ``root``'s index.json lists is there with the size it gives: a deleted or truncated
    shard is named at start-up, before the run writes anything (streaming would fail at its first read, and
    take a deleted file for a missing remote)."""
    index = Path(root) / INDEX_FILE
    try:
        listed = [s["raw_data"] for s in json.loads(index.read_text())["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ShardFormatError(f"{index} is unreadable ({one_line(err)}): rebuild the dataset") from None
    for raw in listed:
        path = Path(root) / raw["basename"]
        size = path.stat().st_size if path.is_file() else None
        if size is None or size != raw.get("bytes", size):
            what = "is missing (deleted?)" if size is None else f"has {size} bytes, index.json says {raw['bytes']}"
            raise ShardFormatError(f"shard file {path} {what}: restore it, or rebuild the dataset "
                                   f"(sfd extract, sfd import-latents)")


def _shard_source(cfg) -> TrainingData:
    d = cfg.data
    fetch_dataset_files(d.path, d.remote)
    meta = read_meta(d.path)
    if d.remote is None:  # a remote dataset's local cache fills as it streams
        check_local_shards(d.path)
    cols = meta["columns"]
    opened: List[Tuple[LatentShardDataset, StreamingLease]] = []
    online = cfg.model.use_repa and d.repa_features == "online"
    if online:  # missing images, DALI or weights are named before anything is written
        require_images(d.path, cols)
        require_package("nvidia.dali", DALI_MISSING)
    dino = dataset_dino(meta, d.dino, d.path) if online else None

    def batches(start_step: int, where: Placement) -> Iterable[dict]:
        lease = StreamingLease.acquire()
        ds = LatentShardDataset(d.path, remote=d.remote, batch_size=where.per_rank, seed=cfg.train.seed,
                                hflip=d.hflip, norm=Normalization(d.latent_norm, d.latent_sv_norm, d.latent_multiplier),
                                repa=cfg.model.use_repa and not online, images=online,
                                canonical_nodes=d.canonical_nodes,
                                replication=where.replication if where.replication > 1 else None)
        lease.record(ds)
        opened.append((ds, lease))
        shard_batches = ShardBatches(ds, start_step, where)
        if not online:
            return shard_batches
        return OnlineRepa(dino, where.device, d.repa_chunk, max(d.num_workers, 1)).attach(shard_batches)

    def close() -> None:
        while opened:
            ds, lease = opened.pop()
            lease.release(ds)

    channels = latent_channels(cols)
    stats = shard_latent_stats(d.path, d)
    return TrainingData(channels, None, _texture_decoder(cfg, stats),
                        f"latent shards at {d.path}: {meta['num_samples']} samples, {channels} channels"
                        + ("; REPA targets computed online from the shards' JPEG crops" if online else ""),
                        has_repa_features="image" in cols if online else "feats_dino" in cols, batches=batches,
                        close=close, latent_stats=stats)


def _synthetic_source(cfg) -> TrainingData:
    """Random latents, labels and (with REPA) float16 features in the config's shapes: one pool per rank, drawn
    once from ``train.seed`` and handed out every step with the step's dataset indices (the trainer keys its
    draws by them), so a step costs no reading and no data generation."""
    m, s = cfg.model, cfg.sfd
    channels, grid = s.texture_chans + s.semantic_chans, m.input_size // (m.patch_size or 1)

    def batches(start_step: int, where: Placement) -> Iterable[dict]:
        g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + where.dp_rank)
        n = where.per_rank
        pool = {"latent": torch.randn(n, channels, m.input_size, m.input_size, generator=g),
                "label": torch.randint(0, m.num_classes, (n,), generator=g)}
        if m.use_repa:
            pool["repa"] = torch.randn(n, m.repa_feature_dim, grid, grid, generator=g).half()
        if where.pin_memory:
            pool = {k: v.pin_memory() for k, v in pool.items()}
        first = where.dp_rank * n
        for step in itertools.count(start_step):
            yield pool | {"index": torch.arange(first, first + n) + step * where.global_batch}

    return TrainingData(channels, m.num_classes, None, f"synthetic random latents ({channels} channels, "
                        f"{m.input_size}x{m.input_size})", m.use_repa, batches)


def build_training_data(cfg) -> TrainingData:
    """Dataset named by ``cfg.data`` (latent shards, the official latent folder, the digits demo, or synthetic)."""
    d = cfg.data
    if d.source == "shards":
        return _shard_source(cfg)
    if d.source == "synthetic":
        return _synthetic_source(cfg)
    if d.source == "demo":
        demo = build_demo_latents(seed=cfg.train.seed, semantic_chans=cfg.sfd.semantic_chans,
                                  num_samples=d.demo_samples)
        view = _IndexFlipView(lambda i, flip: (demo.latents[i], demo.labels[i]), len(demo))
        return TrainingData(demo.latents.shape[1], demo.num_classes, demo.decode,
                            f"scikit-learn digits: {len(demo)} images 16x16 -> latents {tuple(demo.latents.shape[1:])}",
                            False, _map_style_batches(view, cfg.train.seed, d.hflip),
                            reference_images=lambda: images_to_uint8(demo.images).numpy().repeat(3, axis=-1))
    ds = OfficialLatentDataset(d.path, latent_norm=d.latent_norm, latent_sv_norm=d.latent_sv_norm,
                               latent_multiplier=d.latent_multiplier)
    sample = ds.read(0, False)
    view = _IndexFlipView(ds.read, len(ds))
    stats = official_latent_stats(ds, d)
    return TrainingData(sample[0].shape[0], None, _texture_decoder(cfg, stats),
                        f"official latent folder {d.path}: {len(ds)} samples, latents {tuple(sample[0].shape)}",
                        len(sample) == 3, _map_style_batches(view, cfg.train.seed, d.hflip), latent_stats=stats)


# ------------------------------------------------------------------------------------------ decoding
def _texture_decoder(cfg, stats: LatentStats) -> Optional[TextureDecoder]:
    return TextureDecoder(cfg.sample.texture_vae, stats, cfg.sfd.texture_chans) if cfg.sample.texture_vae else None


def sampling_latent_stats(cfg, stored: Optional[LatentStats] = None) -> LatentStats:
    """The latent normalisation to undo when decoding samples of a model, without its training data at hand:
    ``sample.latent_stats`` (a statistics file) when set, else ``stored`` (the checkpoint's own), else the
    dataset at ``data.path``'s. ConfigError naming both keys when none is there and the latents were normalised."""
    d = cfg.data
    if cfg.sample.latent_stats:
        return stats_file_latent_stats(cfg.sample.latent_stats, d)
    if stored is not None:
        return stored
    if not d.latent_norm:
        return LatentStats(False, d.latent_sv_norm, d.latent_multiplier)
    if not d.path:
        raise ConfigError("decoding samples needs the latent statistics the model was trained with, and this "
                          "checkpoint does not carry them (official weights, or saved by an older sfd_scale): set "
                          "data.path to its training latents, or sample.latent_stats to the dataset's statistics "
                          "file (latents_stats.pt of an official latent folder, stats.safetensors of latent shards)")
    if d.source == "shards":
        fetch_dataset_files(d.path, d.remote)
        return shard_latent_stats(d.path, d)
    return official_latent_stats(OfficialLatentDataset(d.path, latent_norm=True, latent_sv_norm=False,
                                                       latent_multiplier=d.latent_multiplier), d)


def sampling_decoder(cfg, stored: Optional[LatentStats] = None) -> Tuple[Optional[Callable], Optional[int]]:
    """(decoder, number of classes where the data knows it) of a run when sampling it from a checkpoint: its
    ``TrainingData.decode`` built without reading the training latents. The demo's own decoder and 10 digits;
    the texture VAE with ``sampling_latent_stats``; None (synthetic data, or no ``sample.texture_vae``)."""
    if cfg.data.source == "demo":
        demo = build_training_data(cfg)
        return demo.decode, demo.num_classes
    if cfg.data.source == "synthetic" or not cfg.sample.texture_vae:
        return None, None
    return _texture_decoder(cfg, sampling_latent_stats(cfg, stored)), None
