"""REPA targets computed online: the shards carry each crop as JPEG bytes, and a frozen DINOv2 turns every
training batch's decoded crops into its targets (``data.repa_features: online``).

Why (README "Data: from images to training batches"): float16 DINOv2 features are 384 KB per sample and flip,
~8x the latents; the JPEG of a 256 x 256 crop is ~40 KB (``benchmarks/online_repa.md``).

What a batch goes through (``OnlineRepa.targets``), after the loader has read it (``LatentShardDataset`` with
``images``: the sample's JPEG bytes and the flip its key drew from (seed, epoch, index), nothing drawn here):
DALI decodes the JPEGs (nvJPEG on a GPU, else the CPU; ``images.ImageDecoder``), the crops are mirrored where
the key says so (``encoders.flip_crops``) and DINOv2 runs on them as the extraction runs it
(``encoders.unit_images``, then ``DinoEncoder``'s own resize and normalisation). An extraction with
``images=true`` feeds its encoders the same decoded JPEGs, so online targets equal its stored ``feats_dino``
up to float rounding (stored: float16; online on the CPU: float32; ``tests/data/test_online_repa.py`` states
the bound it checks).

``FrozenDino`` runs DINOv2 without gradients in chunks of a fixed number of images (``data.repa_chunk``; the
last chunk padded with black images), so a sample's target does not depend on how many samples its rank's
batch holds: data-parallel layouts and resumed runs see the same targets, bit for bit on one device type. On
CUDA it runs under bf16 autocast and ``torch.compile`` (one static shape); on the CPU eager float32.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch

from ..config import ConfigError
from ..errors import MissingInputError
from .encoders import CompositeEncoder, DinoEncoder, flip_crops, unit_images
from .images import ImageDecoder, unpack_images


class FrozenDino:
    """``DinoEncoder`` on uint8 (B, H, W, 3) crops -> (B, D, H/16, W/16) features, in fixed-size chunks."""

    def __init__(self, dino: DinoEncoder, device, chunk: int = 32):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.device, self.chunk = torch.device(device), chunk
        self.dino = dino.to(self.device).eval().requires_grad_(False)
        self.cuda = self.device.type == "cuda"
        self.forward = torch.compile(self.dino) if self.cuda else self.dino

    @torch.no_grad()
    def __call__(self, crops: torch.Tensor, flips: Optional[torch.Tensor] = None) -> torch.Tensor:
        crops = crops.to(self.device)
        if flips is not None:
            crops = flip_crops(crops, flips)
        out = []
        for start in range(0, len(crops), self.chunk):
            part = crops[start:start + self.chunk]
            n = len(part)
            if n < self.chunk:  # pad: every call has one shape (one compiled graph, batch-independent results)
                part = torch.cat([part, part.new_zeros((self.chunk - n, *part.shape[1:]))])
            with torch.autocast("cuda", torch.bfloat16, enabled=self.cuda):
                out.append(self.forward(unit_images(part, self.device))[:n])
        return torch.cat(out)


def dataset_dino(meta: dict, dino_path: Optional[str], root) -> DinoEncoder:
    """The DINOv2 of a dataset's online targets: ``dino_path`` (``data.dino``) when given, else the one its
    extraction used (``sfd_dataset.json``'s ``extraction``: weights path, or the tiny random stand-in of
    ``random_init``), with the extraction's resize setting."""
    extraction = meta.get("extraction") or {}
    if dino_path:
        dino = DinoEncoder.from_pretrained(dino_path)
    elif extraction.get("random_init"):
        dino = CompositeEncoder.random_init(0).dino  # extract.build_encoder's stand-in, same weights
    elif (extraction.get("weights") or {}).get("dino"):
        path = extraction["weights"]["dino"]
        try:
            dino = DinoEncoder.from_pretrained(path)
        except MissingInputError as err:
            raise MissingInputError(f"{err} (the DINOv2 that extracted {root}; set data.dino to where its weights "
                                    f"are on this machine)") from None
    else:
        raise ConfigError(f"data.repa_features=online needs DINOv2 weights: set data.dino ({root} does not record "
                          f"the DINOv2 that made it, e.g. imported official latents)")
    dino.antialias = extraction.get("dino_antialias", True)
    return dino


class OnlineRepa:
    """Adds ``repa`` (on ``device``) to batches that carry images (``images.pack_images``). Built where the
    batches are consumed; its DALI pipeline and DINOv2 live there (one per training process)."""

    def __init__(self, dino: DinoEncoder, device, chunk: int = 32, num_threads: int = 2):
        self.encoder = FrozenDino(dino, device, chunk)
        self.decoder = ImageDecoder(device, num_threads, max_batch=max(chunk, 64))

    def targets(self, batch: dict) -> dict:
        encoded, flips = unpack_images(batch)
        batch["repa"] = self.encoder(self.decoder.decode(encoded), flips)
        return batch

    def attach(self, batches: Iterable[dict]) -> Iterator[dict]:
        """``batches`` with their REPA targets, computed as each one is asked for."""
        iterator = iter(batches)
        try:
            for batch in iterator:
                yield self.targets(batch)
        finally:
            if hasattr(iterator, "close"):
                iterator.close()  # stops ShardBatches' reader threads when training ends early
