"""Latent extraction: images -> DALI decode + ADM center crop -> composite encoders -> MDS latent shards.

The sorted input list (ImageFolder order, or a list file's order) is cut into chunks of ``chunk_size`` items;
chunk ``k`` becomes part ``k`` (``shards.PartWriter``: a part appears only when complete). Rank ``r`` of
``WORLD_SIZE`` (env ``RANK``/``WORLD_SIZE``; no process group) takes the chunks with ``k % world == r`` whose part
is not finished yet, so a restart redoes only unfinished chunks. Posterior noise comes from one generator per
(seed, source index, flip): the dataset does not depend on batch size, rank count or restarts.

Finalizing (merged index, statistics, ``sfd_dataset.json``) needs no coordination: every rank checks after its
own chunks whether all parts exist, and the one that sees them all takes ``.finalize.lock`` (``O_CREAT|O_EXCL``;
removed afterwards, ignored after ``LOCK_STALE_S``). Since each rank checks after writing its last part, the
last rank to finish always sees every part. ``--finalize-only`` runs just that step (taking over a lock left
by a finalizer that died). Temporary part directories of killed writers are removed
(``shards.remove_unfinished``) before their chunk is redone and when finalizing.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..device import resolve_device
from ..config import ConfigError, require_package
from ..logging import show_progress
from . import shards
from .extract_settings import RANDOM_SEMVAE, ExtractConfig, load_extract_config, validate  # noqa: F401
from .images import DALI_MISSING, ImageDecoder, jpeg_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
CONFIG_FILE, LOCK_FILE, LOCK_STALE_S = "extract_config.json", ".finalize.lock", 600.0
PAUSE_ENV = "SFD_EXTRACT_PAUSE_AFTER_PART"  # tests: seconds to sleep after each finished part


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    files: List[str]     # absolute paths, in dataset order (position = source_index)
    labels: List[int]
    classes: List[str]

    def digest(self) -> str:
        h = hashlib.sha256()
        for f, y in zip(self.files, self.labels):
            h.update(f"{f}\t{y}\n".encode())
        return h.hexdigest()


def list_inputs(root, input_list: Optional[str] = None) -> Inputs:
    """ImageFolder order (classes sorted, label = class index, files sorted within a class) or a list file's
    lines ``relative/path label`` in file order. Raises ConfigError for empty inputs and bad lines."""
    root = Path(root).resolve()
    files, labels = [], []
    if input_list is not None:
        for n, line in enumerate(Path(input_list).read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise ConfigError(f"{input_list}:{n}: expected 'relative/path label', got {line!r}")
            path = root / parts[0].strip()
            if not path.is_file():
                raise ConfigError(f"{input_list}:{n}: image not found: {path}")
            files.append(str(path))
            labels.append(int(parts[1]))
        classes = [str(c) for c in sorted(set(labels))]
    else:
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        for label, name in enumerate(classes):
            for dirpath, _, fnames in sorted(os.walk(root / name, followlinks=True)):
                for fname in sorted(fnames):
                    if fname.lower().endswith(IMAGE_EXTENSIONS):
                        files.append(os.path.join(dirpath, fname))
                        labels.append(label)
    if not files:
        raise ConfigError(f"no images found under {root}" + (f" (list {input_list})" if input_list else
                          " (expected one sub-folder per class)"))
    return Inputs(files, labels, classes)


# ----------------------------------------------------------------------------------------------- decode + crop
def crop_batches(files: Sequence[str], resolution: int, batch_size: int, num_threads: int = 2,
                 device: str = "cpu") -> Iterator[Tuple[torch.Tensor, List[int]]]:
    """(uint8 crops (B, resolution, resolution, 3) on ``device``, positions in ``files``) in file order.

    DALI decodes (GPU ``mixed`` decoding when ``device`` is CUDA), resizes the short side to ``resolution``
    with antialiased cubic interpolation and center-crops (offset floor((size - resolution) / 2)). This is the
    DALI equivalent of ADM's PIL ``center_crop_arr`` (box halvings + bicubic + center crop), not bit-identical."""
    require_package("nvidia.dali", DALI_MISSING)
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    gpu = torch.device(device).type == "cuda"

    @pipeline_def
    def pipe():
        data, pos = fn.readers.file(files=list(files), labels=list(range(len(files))), random_shuffle=False,
                                    name="Reader")
        img = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB)
        img = fn.resize(img, resize_shorter=resolution, interp_type=types.INTERP_CUBIC, antialias=True)
        return fn.crop(img, crop=(resolution, resolution), crop_pos_x=0.5, crop_pos_y=0.5, rounding="truncate"), pos

    device_id = (torch.device(device).index or 0) if gpu else None
    it = DALIGenericIterator(pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                                  seed=0), ["images", "pos"], reader_name="Reader",
                             last_batch_policy=LastBatchPolicy.PARTIAL)
    expected = 0
    for out in it:
        pos = out[0]["pos"].view(-1).tolist()
        if pos != list(range(expected, expected + len(pos))):
            raise RuntimeError(f"DALI returned files out of order: {pos}")
        expected += len(pos)
        yield out[0]["images"], pos
    if expected != len(files):
        raise RuntimeError(f"DALI returned {expected} of {len(files)} images")


def load_crops(files: Sequence[str], resolution: int, batch_size: int = 16, device: str = "cpu") -> torch.Tensor:
    """All crops of ``files`` as one uint8 (N, resolution, resolution, 3) tensor (what extraction encodes)."""
    return torch.cat([b.clone() for b, _ in crop_batches(files, resolution, batch_size, device=device)])


# ----------------------------------------------------------------------------------------------- encoding
def encode_samples(encoder, crops: torch.Tensor, indices: Sequence[int], labels: Sequence[int], seed: int,
                   features: bool, bf16: bool = False, images: Optional[Sequence[bytes]] = None) -> List[dict]:
    """Shard samples for a batch of crops: the crops and their mirror images go through the encoders in one
    batch of 2B (the image first, then the flips), each with its own (seed, index, flip) generator. ``images``:
    the crops' JPEG bytes, stored as column ``image``."""
    from .encoders import flip_crops, image_generators
    b = len(indices)
    x = torch.cat([crops, flip_crops(crops, [True] * b)])
    gens = image_generators(seed, indices, False) + image_generators(seed, indices, True)
    device = next(encoder.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16 and device.type == "cuda"):
        out = encoder.encode(x, with_features=features, generator=gens)
    out = {k: v.float().cpu() for k, v in out.items()}
    samples = []
    for i, (src, label) in enumerate(zip(indices, labels)):
        s = {"latents": out["latents"][i].numpy(), "latents_flip": out["latents"][b + i].numpy()}
        if "latents_sv" in out:
            s["latents_sv"], s["latents_sv_flip"] = out["latents_sv"][i].numpy(), out["latents_sv"][b + i].numpy()
        if features:
            s["feats_dino"] = out["feats_dino"][i].half().numpy()
            s["feats_dino_flip"] = out["feats_dino"][b + i].half().numpy()
        if images is not None:
            s["image"] = bytes(images[i])
        s["label"] = int(label)
        s["source_index"] = np.array([src], dtype=np.int64)
        samples.append(s)
    return samples


def jpeg_round_trip(crops: torch.Tensor, quality: int, decoder: ImageDecoder) -> Tuple[torch.Tensor, List[bytes]]:
    """(the crops as their stored JPEGs decode, the JPEG bytes): with ``images`` on, the encoders see what
    training decodes (``online_repa``), through the same decoder."""
    encoded = [jpeg_bytes(c, quality) for c in crops.cpu().numpy()]
    return decoder.decode([np.frombuffer(e, np.uint8) for e in encoded]), encoded


def build_encoder(cfg: ExtractConfig, device: str):
    from .encoders import CompositeEncoder, SemanticEncoder
    if cfg.random_init:  # fixed weights (seed 0): ``seed`` only drives the posterior noise
        enc = CompositeEncoder.random_init(0, device=device, texture_mode=cfg.texture_mode)
        if cfg.semvae != RANDOM_SEMVAE:  # none (a first pass) or a trained one (the recipe's second pass)
            semantic = None if cfg.semvae is None else SemanticEncoder.from_pretrained(cfg.semvae)
            enc = CompositeEncoder(enc.texture, enc.dino, semantic).to(device)
    else:
        enc = CompositeEncoder.from_paths(cfg.texture_vae, cfg.dino, cfg.semvae, device=device,
                                          texture_mode=cfg.texture_mode)
    enc.dino.antialias = cfg.dino_antialias
    return enc


def rank_world() -> Tuple[int, int]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank} WORLD_SIZE={world}")
    return rank, world


# ----------------------------------------------------------------------------------------------- bookkeeping
def provenance(cfg: ExtractConfig, inputs: Inputs) -> dict:
    """What determines the dataset's contents; a resumed or concurrent rank must agree on all of it."""
    stand_ins = ("texture_vae", "dino") if cfg.random_init else ()
    weights = {k: None if k in stand_ins or getattr(cfg, k) in (None, RANDOM_SEMVAE)
               else str(Path(getattr(cfg, k)).resolve()) for k in ("texture_vae", "dino", "semvae")}
    weights["semvae"] = weights["semvae"] or (cfg.semvae and RANDOM_SEMVAE)
    return {"num_items": len(inputs.files), "inputs_sha256": inputs.digest(), "resolution": cfg.resolution,
            "chunk_size": cfg.chunk_size, "seed": cfg.seed, "features": cfg.features, "bf16": cfg.bf16,
            "texture_mode": cfg.texture_mode, "dino_antialias": cfg.dino_antialias, "random_init": cfg.random_init,
            "weights": weights, **({"images": True, "jpeg_quality": cfg.jpeg_quality} if cfg.images else {})}


def claim_output(root: Path, prov: dict) -> None:
    """Write ``extract_config.json`` once (atomically, first writer wins) or check that it matches."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / CONFIG_FILE
    if not path.exists():
        tmp = root / f".tmp_{CONFIG_FILE}_{os.getpid()}"
        tmp.write_text(json.dumps(prov, indent=2, sort_keys=True))
        try:
            os.link(tmp, path)  # fails if another rank was first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    old = json.loads(path.read_text())
    diff = sorted(k for k in set(old) | set(prov) if old.get(k) != prov.get(k))
    if diff:
        raise ConfigError(f"{path}: this output was started with different settings ({', '.join(diff)}: "
                          f"{[old.get(k) for k in diff]} != {[prov.get(k) for k in diff]}); use a new output")


def chunk_range(k: int, chunk: int, n: int) -> range:
    return range(k * chunk, min((k + 1) * chunk, n))


def try_finalize(cfg: ExtractConfig, inputs: Inputs, n_chunks: int, force: bool = False,
                 refresh: bool = False) -> Optional[dict]:
    """Finalize when every part exists and no other rank holds the lock; returns the dataset info or None.
    An already finalized dataset is finalized again only with ``refresh`` (parts were rewritten) or ``force``
    (``--finalize-only``, which also takes over a leftover lock)."""
    root = Path(cfg.output)
    done = set(shards.finished_parts(root))
    missing = [k for k in range(n_chunks) if shards.part_name(k) not in done]
    if missing:
        if force:
            raise ConfigError(f"cannot finalize {root}: {len(missing)} of {n_chunks} parts missing "
                              f"(first: {shards.part_name(missing[0])})")
        return None
    if (root / shards.META_FILE).is_file() and not (force or refresh):
        return json.loads((root / shards.META_FILE).read_text())
    lock = root / LOCK_FILE
    if lock.exists() and (force or time.time() - lock.stat().st_mtime > LOCK_STALE_S):
        lock.unlink(missing_ok=True)  # a finalizer that died; finalizing takes seconds
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return None  # another rank is finalizing
    try:
        os.write(fd, f"{os.uname().nodename} {os.getpid()}\n".encode())
        os.close(fd)
        meta = {"source": "sfd_scale.data.extract", "classes": inputs.classes, "num_classes": len(inputs.classes),
                "input": str(Path(cfg.input).resolve()), "input_list": cfg.input_list,
                "extraction": json.loads((root / CONFIG_FILE).read_text())}
        return shards.finalize(root, meta)
    finally:
        lock.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- the run
def extract(cfg: ExtractConfig, rank: int = 0, world: int = 1, finalize_only: bool = False) -> dict:
    """Run this rank's unfinished chunks, then finalize if all parts exist. Returns a summary dict."""
    from tqdm.auto import tqdm
    validate(cfg)
    if not finalize_only:  # finalizing reads only the finished parts, no images
        require_package("nvidia.dali", DALI_MISSING)
    inputs = list_inputs(cfg.input, cfg.input_list)
    n, root = len(inputs.files), Path(cfg.output)
    n_chunks = math.ceil(n / cfg.chunk_size)
    start = time.time()
    todo: List[int] = []
    if not finalize_only:
        done = set(shards.finished_parts(root))
        todo = [k for k in range(rank, n_chunks, world) if shards.part_name(k) not in done]
    images = sum(len(chunk_range(k, cfg.chunk_size, n)) for k in todo)
    device = str(resolve_device(cfg.device, "device"))
    encoder = build_encoder(cfg, device) if todo else None  # weight errors surface before anything is written
    claim_output(root, provenance(cfg, inputs))
    if todo:
        pause = float(os.environ.get(PAUSE_ENV, 0))
        bar = tqdm(total=images, unit="img", desc=f"extract r{rank}/{world}", dynamic_ncols=True,
                   disable=not show_progress(cfg.progress, rank))
        decoder = ImageDecoder(device, cfg.num_threads, cfg.batch_size) if cfg.images else None
        for k in todo:
            items = chunk_range(k, cfg.chunk_size, n)
            with shards.PartWriter(root, k) as writer:
                for crops, pos in crop_batches([inputs.files[i] for i in items], cfg.resolution, cfg.batch_size,
                                               cfg.num_threads, device):
                    idx, encoded = [items[p] for p in pos], None
                    if decoder is not None:
                        crops, encoded = jpeg_round_trip(crops, cfg.jpeg_quality, decoder)
                    for s in encode_samples(encoder, crops, idx, [inputs.labels[i] for i in idx], cfg.seed,
                                            cfg.features, cfg.bf16, encoded):
                        writer.write(s)
                    bar.update(len(idx))
            if pause:
                time.sleep(pause)
        bar.close()
    seconds = time.time() - start
    info = try_finalize(cfg, inputs, n_chunks, force=finalize_only, refresh=bool(todo))
    return {"rank": rank, "world": world, "images": images, "parts": len(todo), "seconds": seconds,
            "images_per_s": images / seconds if images and seconds > 0 else 0.0, "output": str(root),
            "total_parts": n_chunks, "finalized": info is not None,
            "num_samples": info["num_samples"] if info else None}


def summary_text(s: dict) -> str:
    done = (f"dataset finalized: {s['num_samples']} samples in {s['total_parts']} parts, statistics in "
            f"{Path(s['output']) / shards.STATS_FILE}" if s["finalized"] else
            "not finalized yet: the rank that writes the last part finalizes (or run --finalize-only)")
    return (f"Rank {s['rank']}/{s['world']} encoded {s['images']} images (each also flipped) into {s['parts']} "
            f"new parts in {s['seconds']:.1f} s ({s['images_per_s']:.2f} images/s) -> {s['output']}; {done}.")
