"""Tests for the CPU demo data: digits, fixed texture/semantic encoders, composite latents, PNG grids."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sfd_scale.data.demo import (
    DemoLatentDataset, PatchPCASemanticEncoder, PixelTextureCodec, build_demo_latents, images_to_uint8,
    load_digit_images, save_image_grid,
)


@pytest.fixture(scope="module")
def demo():
    return build_demo_latents(seed=0)


def _nearest_class_mean_accuracy(z: torch.Tensor, y: torch.Tensor) -> float:
    """Class means from the first half, accuracy on the held-out second half."""
    z = z.flatten(1).double()
    ntr = z.shape[0] // 2
    means = torch.stack([z[:ntr][y[:ntr] == c].mean(0) for c in range(10)])
    pred = torch.cdist(z[ntr:], means).argmin(1)
    return (pred == y[ntr:]).double().mean().item()


def test_digit_images_range_and_labels():
    x, y = load_digit_images(16)
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.99 and x.max() > 0.9
    assert y.dtype == torch.int64 and sorted(y.unique().tolist()) == list(range(10))


def test_texture_codec_round_trip_exact():
    codec = PixelTextureCodec(2)
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (5, 4, 8, 8)
    assert torch.allclose(codec.decode(z), x, atol=1e-6, rtol=0)
    assert codec.decode(z * 10).abs().max() <= 1.0  # decoded samples are clamped to the image range


def test_composite_latent_shape_and_normalisation(demo):
    assert demo.latents.shape == (1797, 6, 8, 8) and demo.latents.dtype == torch.float32
    assert demo.labels.shape == (1797,) and demo.labels.dtype == torch.int64
    assert int(demo.labels.min()) == 0 and int(demo.labels.max()) == 9
    assert (demo.texture_chans, demo.semantic_chans, demo.num_classes) == (4, 2, 10)
    assert demo.mean.shape == (6,) and demo.std.shape == (6,)
    assert demo.latents.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (demo.latents.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-4
    assert torch.isfinite(demo.latents).all()


def test_decode_gives_back_the_digits(demo):
    out = demo.decode(demo.latents[:64])
    assert out.dtype == torch.uint8 and out.shape == (64, 16, 16, 1)
    ref = images_to_uint8(demo.images[:64])
    assert (out.int() - ref.int()).abs().max() <= 1
    # ...and the semantic channels play no part in decoding.
    z = demo.latents[:8].clone()
    z[:, 4:] = torch.randn_like(z[:, 4:])
    assert torch.equal(demo.decode(z), out[:8])
    # encode() of the source images reproduces the stored latents.
    assert torch.allclose(demo.encode(demo.images[:64]), demo.latents[:64], atol=1e-4)


def test_semantic_encoder_deterministic_and_state_round_trip(demo):
    again = build_demo_latents(seed=0)
    assert torch.equal(again.latents, demo.latents) and torch.equal(again.labels, demo.labels)
    state = demo.semantic_encoder.state_dict()
    assert set(state) == {"components", "mean"} and all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["components"].shape == (2, 36) and state["mean"].shape == (36,)
    fresh = PatchPCASemanticEncoder(channels=2, window=6).load_state_dict(state)
    x = demo.images[:32]
    assert torch.equal(fresh.encode(x), demo.semantic_encoder.encode(x))
    with pytest.raises(RuntimeError):
        PatchPCASemanticEncoder().encode(x)
    with pytest.raises(ValueError):
        PatchPCASemanticEncoder(channels=3).load_state_dict(state)


def test_semantic_channels_separate_classes(demo):
    # Measured: ~0.84 (seed 0) with a 6x6 window; a label-independent or broken encoder gives ~0.1.
    acc = _nearest_class_mean_accuracy(demo.latents[:, 4:], demo.labels)
    assert acc > 0.70, acc
    noise = _nearest_class_mean_accuracy(torch.randn_like(demo.latents[:, 4:]), demo.labels)
    assert noise < 0.3, noise


def test_semantic_layout_is_spatial_and_smooth(demo):
    # Catches position scrambles the classifier test cannot see: the leading component is a local
    # ink-mass detector, so it must track the 2x-pooled image cell by cell.
    sem0 = demo.latents[:, 4]
    pooled = F.avg_pool2d(demo.images, 2)[:, 0]
    corr = torch.corrcoef(torch.stack([sem0.flatten(), pooled.flatten()]))[0, 1]
    assert abs(float(corr)) > 0.85, float(corr)

    def tv(z):  # mean absolute vertical + horizontal neighbour difference
        return (z[..., 1:, :] - z[..., :-1, :]).abs().mean() + (z[..., :, 1:] - z[..., :, :-1]).abs().mean()

    assert tv(demo.latents[:, 4:]) < tv(demo.latents[:, :4])  # coarser than texture


def test_dataset_view_and_hflip(demo):
    ds = demo.dataset()
    assert isinstance(ds, DemoLatentDataset) and len(ds) == 1797 and not ds.hflip
    z, y = ds[3]
    assert torch.equal(z, demo.latents[3]) and int(y) == int(demo.labels[3])
    flipped = demo.dataset(hflip=True)
    ref = images_to_uint8(demo.images[:4].flip(-1))
    assert (demo.decode(flipped.flipped[:4]).int() - ref.int()).abs().max() <= 1
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=16)))
    assert batch[0].shape == (16, 6, 8, 8) and batch[1].dtype == torch.int64


def test_seeded_subset():
    a, b = build_demo_latents(seed=1, num_samples=100), build_demo_latents(seed=1, num_samples=100)
    assert a.latents.shape == (100, 6, 8, 8) and a.labels.shape == (100,)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, build_demo_latents(seed=2, num_samples=100).labels)


def test_save_image_grid(tmp_path, demo):
    imgs = demo.decode(demo.latents[:10])
    path = tmp_path / "nested" / "dir" / "grid.png"
    assert save_image_grid(imgs, path, nrow=4, scale=4, padding=1) == str(path)
    with Image.open(path) as im:
        # 4 columns, 3 rows of 16x16 tiles, 1 px padding, then x4 nearest upscaling.
        assert im.size == ((4 * 17 + 1) * 4, (3 * 17 + 1) * 4) and im.mode == "L"
        arr = np.asarray(im)
    assert np.array_equal(arr[4:4 + 64:4, 4:4 + 64:4], imgs[0, :, :, 0].numpy())
    assert sorted(os.listdir(path.parent)) == ["grid.png"]  # no temp file left behind
    rgb = imgs.repeat(1, 1, 1, 3)
    save_image_grid(rgb, path, nrow=10, scale=1, padding=0)  # overwrite in place
    with Image.open(path) as im:
        assert im.size == (160, 16) and im.mode == "RGB"
    with pytest.raises(ValueError):
        save_image_grid(imgs.float(), path, nrow=4)
