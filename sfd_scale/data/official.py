"""Reader for the official SFD latent dataset format (test oracle).

Behaves like the official ``ImgLatentDataset`` (SFD / LightningDiT, see
``shared/golden/SFD_ALGORITHM.md`` §2 and ``sfd_official/README.md`` §9) so that its outputs can be
compared against the golden vectors, with three deliberate differences that do not change any
returned number: bad inputs raise clear errors, cached statistics are written atomically (and kept
in memory when the folder is read-only), and the flip choice is split out into ``read(idx, flip)``.

On-disk format: a folder of ``*.safetensors`` shards, taken in sorted name order; the global index
is a running count over shards. Each shard holds ``latents``/``latents_flip`` (N,C,H,W), ``labels``
(N,), and optionally ``latents_sv``/``latents_sv_flip`` (semantic latents),
``feats_dino``/``feats_dino_flip`` (REPA features) and the legacy ``latents_dino``/``latents_dino_flip``
block. Per-channel statistics are cached as ``latents_stats.pt`` / ``latents_sv_stats.pt``.
"""
from __future__ import annotations

import operator
import os
import warnings
from bisect import bisect_right
from glob import glob
from typing import Dict, List, Tuple

import numpy as np
import torch
from safetensors import safe_open

from ..atomic import atomic_path
from ..errors import DataError, MissingInputError, one_line
from .shards import PartWriter, composite_latent, finalize, finished_parts

# Each optional block must come with its flipped twin, otherwise a flipped read would fail mid-epoch.
_PAIRED_KEYS = ("latents", "latents_dino", "latents_sv", "feats_dino")
_STATS_MAX_SAMPLES = 10_000  # the official class estimates stats from at most 10k samples


class ShardKeyError(DataError, KeyError):
    """An official shard or stats file lacks a key the reader needs (a KeyError, as a dict lookup would raise)."""


class OfficialLatentDataset(torch.utils.data.Dataset):
    """Official SFD latent dataset: ``(feature, label)`` or ``(feature, label, feature_dino)``.

    feature = latent_multiplier * concat[(latents - mean)/std, latents_dino, (latents_sv - sv_mean)/sv_std]
    (each normalisation only when its flag is on; the dino/sv blocks only when the shard has them),
    float32 (C,H,W); label 0-dim int64; feature_dino float32, neither normalised nor multiplied.
    """

    def __init__(self, data_dir, latent_norm: bool = True, latent_sv_norm: bool = True,
                 latent_multiplier: float = 1.0):
        # NB: the official class defaults latent_sv_norm to False; every SFD config turns it on.
        self.data_dir = os.fspath(data_dir)
        self.latent_norm = latent_norm
        self.latent_sv_norm = latent_sv_norm
        self.latent_multiplier = latent_multiplier
        if not os.path.isdir(self.data_dir):
            raise MissingInputError(f"latent dataset directory not found: {self.data_dir} (data.path)")
        self.files: List[str] = sorted(glob(os.path.join(self.data_dir, "*.safetensors")))
        if not self.files:
            raise MissingInputError(f"no *.safetensors shard in latent dataset directory {self.data_dir} (data.path)")

        # Only shard headers are read here (no tensor data): sizes and key sets.
        self._keys: List[frozenset] = []
        self._starts: List[int] = []  # global index of each shard's first sample
        total = 0
        for path in self.files:
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    keys = frozenset(f.keys())
                    n = self._check_shard(path, f, keys)
            except DataError:
                raise
            except Exception as err:  # safetensors' own error type: a damaged or foreign file
                raise DataError(f"shard {path} is not a readable safetensors file ({one_line(err)}): restore it "
                                f"or remove it from data.path") from err
            self._keys.append(keys)
            self._starts.append(total)
            total += n
        self._len = total

        # Same order as the official class (texture first), so both draws consume the global numpy
        # RNG identically and recomputed stats match the official ones.
        self.latent_mean = self.latent_std = None
        self.latent_sv_mean = self.latent_sv_std = None
        if latent_norm:
            self.latent_mean, self.latent_std = self._get_stats("latents")
        if latent_sv_norm and any("latents_sv" in k for k in self._keys):
            self.latent_sv_mean, self.latent_sv_std = self._get_stats("latents_sv")

    @staticmethod
    def _check_shard(path: str, f, keys: frozenset) -> int:
        """Validate one shard's keys and leading dims; return its number of samples."""
        for key in ("labels", "latents", "latents_flip"):
            if key not in keys:
                raise ShardKeyError(f"shard {path} has no required key '{key}'")
        for key in _PAIRED_KEYS:
            if key in keys and f"{key}_flip" not in keys:
                raise ShardKeyError(f"shard {path} has '{key}' but no required key '{key}_flip'")
        labels_shape = f.get_slice("labels").get_shape()
        if len(labels_shape) != 1:
            raise DataError(f"shard {path}: 'labels' must be 1-D, got shape {labels_shape}")
        n = labels_shape[0]  # the official map counts samples by the labels length
        for key in keys:
            shape = f.get_slice(key).get_shape()
            if not shape or shape[0] != n:
                raise DataError(f"shard {path}: key '{key}' has shape {shape}, expected {n} samples "
                                 f"(the length of 'labels')")
        return n

    def __len__(self) -> int:
        return self._len

    def _locate(self, idx) -> Tuple[int, int]:
        """Global index -> (shard number, row in shard)."""
        try:
            i = operator.index(idx)
        except TypeError:
            raise IndexError(f"dataset index must be an integer, got {idx!r}") from None
        # No negative indexing: the official class maps indices through a dict of 0..len-1.
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for latent dataset {self.data_dir} "
                             f"of length {self._len}")
        shard = bisect_right(self._starts, i) - 1
        return shard, i - self._starts[shard]

    def __getitem__(self, idx):
        # Same draw as the official code: u > 0.5 keeps the original (non-flipped) entries. Looked up
        # as np.random.uniform at call time so tests can monkeypatch it.
        flip = not (np.random.uniform(0, 1) > 0.5)
        return self.read(idx, flip)

    def read(self, idx, flip: bool):
        """Deterministic read of sample ``idx``; ``flip`` selects the ``*_flip`` entry of every key."""
        shard, row = self._locate(idx)
        path, keys = self.files[shard], self._keys[shard]
        sfx = "_flip" if flip else ""

        with safe_open(path, framework="pt", device="cpu") as f:
            def row_of(key: str) -> torch.Tensor:
                # get_slice reads only this row from disk; keep the (1, ...) batch dim like the
                # official code, drop it at the end.
                return f.get_slice(key)[row:row + 1]

            stats = {"latents_mean": self.latent_mean, "latents_std": self.latent_std,
                     "latents_sv_mean": self.latent_sv_mean, "latents_sv_std": self.latent_sv_std}
            feature = composite_latent(
                row_of("latents" + sfx).float(), row_of("latents_sv" + sfx).float() if "latents_sv" in keys else None,
                stats, self.latent_norm, self.latent_sv_norm, self.latent_multiplier,
                row_of("latents_dino" + sfx).float() if "latents_dino" in keys else None).squeeze(0)
            label = row_of("labels").to(torch.int64).squeeze(0)
            if "feats_dino" in keys:
                return feature, label, row_of("feats_dino" + sfx).float().squeeze(0)
        return feature, label

    # ------------------------------------------------------------------ statistics
    def _get_stats(self, key: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Load ``{key}_stats.pt`` if present, else compute it and try to cache it."""
        path = os.path.join(self.data_dir, f"{key}_stats.pt")
        if os.path.exists(path):
            stats = torch.load(path, map_location="cpu", weights_only=True)
            for name in ("mean", "std"):
                if not isinstance(stats, dict) or name not in stats:
                    raise ShardKeyError(f"stats file {path} has no key '{name}'")
        else:
            stats = self._compute_stats(key)
            self._save_stats(stats, path)
        return stats["mean"], stats["std"]

    def _compute_stats(self, key: str) -> Dict[str, torch.Tensor]:
        """Mean / unbiased std over (samples, H, W) of up to 10k random non-flipped samples."""
        if self._len == 0:
            raise ValueError(f"cannot compute '{key}' stats: latent dataset {self.data_dir} has no samples")
        num = min(_STATS_MAX_SAMPLES, self._len)
        indices = np.random.choice(self._len, num, replace=False)  # global RNG, as the official code
        rows = []
        for idx in indices:
            shard, row = self._locate(int(idx))
            if key not in self._keys[shard]:
                raise ShardKeyError(f"shard {self.files[shard]} has no key '{key}' needed for its stats")
            with safe_open(self.files[shard], framework="pt", device="cpu") as f:
                rows.append(f.get_slice(key)[row:row + 1])
        latents = torch.cat(rows, dim=0)
        return {"mean": latents.mean(dim=[0, 2, 3], keepdim=True),
                "std": latents.std(dim=[0, 2, 3], keepdim=True)}

    @staticmethod
    def _save_stats(stats: Dict[str, torch.Tensor], path: str) -> None:
        """Atomic write: concurrent ranks never see a half-written file."""
        try:
            with atomic_path(path) as tmp:
                torch.save(stats, tmp)
        except OSError as exc:
            # Read-only datasets (shared storage) are common; the stats are still valid in memory.
            warnings.warn(f"could not cache latent stats at {path} ({exc}); keeping them in memory only",
                          RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------- import
def _image_inputs(reader: OfficialLatentDataset, images, image_list):
    """The user's images of an official latent folder (``extract.list_inputs`` order: ImageFolder, or
    ``image_list``'s lines), checked against it: one per sample, and every label equal to the sample's."""
    from .extract import list_inputs

    inputs = list_inputs(images, image_list)
    if len(inputs.files) != len(reader):
        raise DataError(f"{images}: {len(inputs.files)} images, but {reader.data_dir} holds {len(reader)} samples: "
                        f"give the images the latents were extracted from (--image-list for another order)")
    for k, path in enumerate(reader.files):
        with safe_open(path, framework="np") as f:
            labels = f.get_tensor("labels")
        start = reader._starts[k]
        for row, label in enumerate(labels.tolist()):
            if inputs.labels[start + row] != int(label):
                raise DataError(f"image {inputs.files[start + row]} (sample {start + row}) has label "
                                f"{inputs.labels[start + row]}, the official sample {int(label)}: the latents were "
                                f"extracted in another order; give it with --image-list (path label per line)")
    return inputs


def _jpegs(files, resolution: int, quality: int, num_threads: int) -> list:
    """The extraction's centre crops (``extract.crop_batches``) of ``files``, as JPEG bytes."""
    from .extract import crop_batches
    from .images import jpeg_bytes

    return [jpeg_bytes(crop, quality) for crops, _ in crop_batches(files, resolution, 64, num_threads)
            for crop in crops.numpy()]


def import_official(src, dst, progress: bool = True, images=None, image_list=None, jpeg_quality: int = 95,
                    num_threads: int = 2) -> dict:
    """Convert an official latent folder into sfd_scale latent shards at ``dst``, value-exact.

    One part per official shard file, in the official (sorted) order, so global indices are unchanged;
    stored dtypes are kept. The statistics are the folder's ``latents_stats.pt`` / ``latents_sv_stats.pt``
    when present (the numbers the official reader uses); otherwise exact per-channel mean / unbiased std
    over every non-flipped sample (the official class would estimate them from 10k random samples of the
    global numpy RNG). Rerunning after a crash skips the parts already written. Returns the dataset info.

    ``images`` (an ImageFolder tree, or the root of ``image_list``'s paths, in the official sample order)
    attaches each sample's image as the JPEG of the extraction's centre crop at the latents' resolution (column
    ``image``, for ``data.repa_features=online``; give ``data.dino`` then). The official latents were encoded
    from PIL crops of the original images, not from these JPEGs: online targets see the same picture, within
    JPEG and resampling differences.
    """
    from tqdm.auto import tqdm

    reader = OfficialLatentDataset(src, latent_norm=False, latent_sv_norm=False)  # headers only, no stats
    inputs = _image_inputs(reader, images, image_list) if images is not None else None
    stats = {}
    for key in ("latents", "latents_sv"):
        path = os.path.join(reader.data_dir, f"{key}_stats.pt")
        if os.path.exists(path):
            mean, std = reader._get_stats(key)
            stats.update({f"{key}_mean": mean.float(), f"{key}_std": std.float()})
    has_sv = any("latents_sv" in k for k in reader._keys)
    if stats and ("latents_mean" not in stats or (has_sv and "latents_sv_mean" not in stats)):
        raise MissingInputError(f"{src} has only some of latents_stats.pt / latents_sv_stats.pt; provide both "
                                f"or neither (then exact statistics are computed)")
    done = set(finished_parts(dst))
    for k, path in enumerate(tqdm(reader.files, desc="import", unit="shard", disable=not progress)):
        if f"part_{k:07d}" in done:
            continue
        with safe_open(path, framework="np") as f:
            tensors = {key: f.get_tensor(key) for key in reader._keys[k]}
        n, jpegs = len(tensors["labels"]), None
        if inputs is not None:
            start = reader._starts[k]
            jpegs = _jpegs(inputs.files[start:start + n], 16 * tensors["latents"].shape[-1], jpeg_quality, num_threads)
        with PartWriter(dst, k) as writer:
            for row in range(n):
                sample = {key: value[row] for key, value in tensors.items() if key != "labels"}
                if jpegs is not None:
                    sample["image"] = jpegs[row]
                sample["label"] = int(tensors["labels"][row])
                writer.write(sample)
    images_info = {} if inputs is None else {"images": os.path.abspath(images), "image_list": image_list,
                                             "jpeg_quality": jpeg_quality}
    return finalize(dst, {"source": "official latent folder", "official_dir": os.path.abspath(reader.data_dir),
                          "stats": "copied from the official stats files" if stats else "exact over all samples",
                          **images_info}, stats=stats or None)
