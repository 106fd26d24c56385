"""Images as the shards and the online encoders see them: JPEG bytes in, uint8 crops out (NVIDIA DALI).

* ``jpeg_bytes``: a crop as the JPEG that a dataset with images stores (column ``image``; PIL, quality
  ``jpeg_quality``, 4:2:0 chroma): a 256 x 256 crop of an ImageNet photo is ~40 KB at quality 95
  (``benchmarks/online_repa.md``), against 384 KB of float16 DINOv2 features per flip.
* ``ImageDecoder``: a DALI pipeline fed from Python (``fn.external_source``) that decodes a batch of encoded
  images, on the GPU (``mixed``: nvJPEG) when the device is CUDA, else on the CPU (``device_id=None``), into a
  uint8 (B, H, W, 3) tensor on that device. ``decode`` returns the images as stored (the crops of an extraction);
  ``decode_crops`` also resizes the short side and cuts a square crop at a given place and flips it, with every
  parameter given per image (the Semantic VAE's random crops: drawn from (seed, step), nothing random in DALI).
* ``pack_images`` / ``unpack_images``: a batch's encoded images as two tensors (bytes end to end and their
  sizes), so they travel through the loader (pinned memory, reader threads) like the other columns.
"""
from __future__ import annotations

import io
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import require_package

# DALI is an extra (setup.py), its wheel chosen by the driver's CUDA major version
DALI_MISSING = ("decoding images needs NVIDIA DALI, which is not installed: pip install "
                "'sfd_scale[extract-cu13]' (CUDA 13 driver) or 'sfd_scale[extract-cu12]' (CUDA 12 driver)")
JPEG_SUBSAMPLING = 2  # PIL's code for 4:2:0 chroma subsampling (libjpeg's default for photos)


def jpeg_bytes(crop: np.ndarray, quality: int) -> bytes:
    """A uint8 (H, W, 3) crop as JPEG bytes (deterministic: the same crop gives the same bytes)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(crop)).save(out, format="JPEG", quality=quality,
                                                     subsampling=JPEG_SUBSAMPLING, optimize=False)
    return out.getvalue()


def pack_images(images: Sequence[np.ndarray], flips: Sequence[bool]) -> Dict[str, torch.Tensor]:
    """A batch's encoded images (uint8 arrays) and flips as ``image`` (the bytes end to end), ``image_sizes``
    and ``flip`` tensors."""
    sizes = torch.tensor([len(x) for x in images], dtype=torch.int64)
    data = torch.from_numpy(np.concatenate(images) if len(images) else np.empty(0, np.uint8))
    return {"image": data, "image_sizes": sizes, "flip": torch.tensor(list(flips), dtype=torch.bool)}


def unpack_images(batch: dict) -> Tuple[List[np.ndarray], torch.Tensor]:
    """(encoded images, flips) taken out of a batch made by ``pack_images`` (the keys are removed)."""
    data, sizes = batch.pop("image").cpu().numpy(), batch.pop("image_sizes").tolist()
    ends = np.cumsum(sizes)
    return [data[end - size:end] for size, end in zip(sizes, ends)], batch.pop("flip")


def dali_device(device) -> Tuple[bool, Optional[int]]:
    """(decode on the GPU, DALI's device_id) for a torch device: CPU pipelines need ``device_id=None``."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, None
    return True, device.index if device.index is not None else torch.cuda.current_device()


class ImageDecoder:
    """Decodes batches of encoded images with DALI into uint8 (B, H, W, 3) tensors on ``device``. Pipelines are
    built at first use (one per kind) and hold up to ``max_batch`` images per run; larger batches run in pieces.
    Not thread-safe: one decoder per thread."""

    def __init__(self, device="cpu", num_threads: int = 2, max_batch: int = 64):
        require_package("nvidia.dali", DALI_MISSING)
        self.device = torch.device(device)
        self.gpu, self.device_id = dali_device(self.device)
        self.num_threads, self.max_batch = num_threads, max_batch
        self._pipes: Dict[object, object] = {}

    def _pipe(self, crop: Optional[int]):
        """The decode pipeline (``crop`` None) or the resize + crop + flip one for ``crop`` x ``crop`` crops."""
        if crop in self._pipes:
            return self._pipes[crop]
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        @pipeline_def
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            image = fn.decoders.image(encoded, device="mixed" if self.gpu else "cpu", output_type=types.RGB)
            if crop is None:
                return image
            shorter, x, y = (fn.external_source(name=n, dtype=types.FLOAT, ndim=0) for n in ("shorter", "x", "y"))
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            # the extraction's resize (crop_batches), then the crop at the given place
            image = fn.resize(image, resize_shorter=shorter, interp_type=types.INTERP_CUBIC, antialias=True)
            image = fn.crop(image, crop=(crop, crop), crop_pos_x=x, crop_pos_y=y, rounding="truncate")
            return fn.flip(image, horizontal=mirror)

        built = pipe(batch_size=self.max_batch, num_threads=self.num_threads, device_id=self.device_id, seed=0,
                     prefetch_queue_depth=1)
        built.build()
        self._pipes[crop] = built
        return built

    def _run(self, crop: Optional[int], inputs: Dict[str, list]) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        pipe, n, parts = self._pipe(crop), len(inputs["encoded"]), []
        for start in range(0, n, self.max_batch):
            for name, values in inputs.items():
                pipe.feed_input(name, values[start:start + self.max_batch])
            (out,) = pipe.run()
            if not out.is_dense_tensor():
                raise ValueError(f"decoded images differ in size ({out.shape()[:3]} ...): the stored crops must "
                                 f"all have the dataset's resolution")
            dense = out.as_tensor()
            parts.append(torch.empty(dense.shape(), dtype=torch.uint8, device=self.device))
            feed_ndarray(dense, parts[-1], torch.cuda.current_stream(self.device) if self.gpu else None)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def decode(self, encoded: Sequence[np.ndarray]) -> torch.Tensor:
        """The images as stored (all the same size), uint8 (B, H, W, 3) on the device."""
        return self._run(None, {"encoded": list(encoded)})

    def decode_crops(self, encoded: Sequence[np.ndarray], size: int, shorter: Sequence[float], x: Sequence[float],
                     y: Sequence[float], mirror: Sequence[bool]) -> torch.Tensor:
        """Per image: decode, resize the short side to ``shorter`` (antialiased cubic, as the extraction's centre
        crop), cut the ``size`` x ``size`` crop whose corner lies at fraction (``x``, ``y``) of the free range,
        and mirror it where ``mirror``. uint8 (B, size, size, 3) on the device."""
        f32 = lambda v: [np.float32(a) for a in v]  # noqa: E731
        return self._run(size, {"encoded": list(encoded), "shorter": f32(shorter), "x": f32(x), "y": f32(y),
                                "mirror": [np.int32(bool(m)) for m in mirror]})


def read_encoded(path) -> np.ndarray:
    """An image file's bytes, as DALI's external source takes them."""
    with open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8)
