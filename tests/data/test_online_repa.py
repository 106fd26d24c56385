"""REPA targets computed online from the shards' JPEG crops (``data/online_repa.py``, ``data/images.py``) against
the stored ones, on real photos with the tiny random DINOv2 and DALI on the CPU.

Precision: the extraction stores float16 features of the decoded JPEG; the online encoder gives float32 features
of the same decoded JPEG through the same ops (``encoders.flip_crops`` -> ``unit_images`` -> ``DinoEncoder``), in
other batches. They agree to within one float16 step of the stored value (``rtol=2**-10``); only the summation
order of other batch compositions separates them before that rounding."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sfd_scale.config import ConfigError, load_config
from sfd_scale.data import shards
from sfd_scale.data.extract import list_inputs, load_crops
from sfd_scale.data.images import ImageDecoder, jpeg_bytes, pack_images, unpack_images
from sfd_scale.data.online_repa import FrozenDino, OnlineRepa, dataset_dino
from sfd_scale.data.shards import LatentShardDataset, ShardFormatError
from sfd_scale.errors import DataError
from tests.data.online_data import IMAGES, extract_online, photo_tree

pytestmark = pytest.mark.usefixtures("streaming_tmp")
FP16_STEP = 2 ** -10  # float16's relative spacing: the stored features' rounding


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return photo_tree(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def dataset(tree, tmp_path_factory):
    return extract_online(tree, tmp_path_factory.mktemp("online") / "ds")


def _open(root, **kw) -> LatentShardDataset:
    return LatentShardDataset(root, batch_size=1, shuffle=False, **kw)


def test_online_targets_equal_stored_targets(dataset):
    """Every sample, both flips (as the loader's keys pick them): online float32 targets equal the stored float16
    ones to within float16 rounding; the flip is the key's (a mirrored target would be far off)."""
    ds = _open(dataset, repa=True, images=True)
    keys = [(i, flip) for flip in (False, True) for i in range(IMAGES)]
    batch = ds.read_batch(keys)
    assert batch["image"].dtype == torch.uint8 and batch["flip"].tolist() == [k[1] for k in keys]
    stored = batch["repa"].float()
    online = OnlineRepa(dataset_dino(ds.meta, None, dataset), "cpu", chunk=5).targets(dict(batch))["repa"]
    assert online.dtype == torch.float32 and online.shape == stored.shape == (2 * IMAGES, 768, 4, 4)
    torch.testing.assert_close(online, stored, rtol=FP16_STEP, atol=1e-7)
    mirrored = torch.cat([stored[IMAGES:], stored[:IMAGES]])
    assert (online - mirrored).abs().max() > 100 * (online - stored).abs().max()


def test_targets_do_not_depend_on_the_batch(dataset):
    """Fixed-size, padded DINOv2 chunks: a sample's target is the same bits in a batch of 8 or of 3 + 5 (what
    a data-parallel rank or a resumed run sees)."""
    ds = _open(dataset, images=True)
    online = OnlineRepa(dataset_dino(ds.meta, None, dataset), "cpu", chunk=4)
    keys = [(i, bool(i % 3)) for i in range(IMAGES)]
    whole = online.targets(ds.read_batch(keys))["repa"]
    parts = torch.cat([online.targets(ds.read_batch(part))["repa"] for part in (keys[:3], keys[3:])])
    assert torch.equal(whole, parts)


def test_extraction_encodes_what_training_decodes(tree, dataset):
    """The stored JPEG is the extraction's centre crop at jpeg_quality 95, and DALI decodes it to the crop that the
    encoders saw: stored features of sample 0 come from that decoded crop."""
    files = list_inputs(tree).files
    crops = load_crops(files[:2], 64)
    ds = _open(dataset, repa=True, images=True)
    batch = ds.read_batch([(0, False), (1, False)])
    encoded, flips = unpack_images(batch)
    assert [e.tobytes() for e in encoded] == [jpeg_bytes(c, 95) for c in crops.numpy()]
    decoded = ImageDecoder("cpu").decode(encoded)
    assert decoded.shape == (2, 64, 64, 3) and (decoded.float() - crops.float()).abs().mean() < 6.0  # q95, 4:2:0
    dino = FrozenDino(dataset_dino(ds.meta, None, dataset), "cpu", chunk=2)
    torch.testing.assert_close(dino(decoded), batch["repa"].float(), rtol=FP16_STEP, atol=1e-7)


def test_image_reads_local_and_through_streaming_agree(dataset):
    """The variable-size image column read by offset (its sample's size head first) equals streaming's decode."""
    fast, slow = _open(dataset, repa=True, images=True), _open(dataset, repa=True, images=True, fast_local_reads=False)
    keys = [(i, bool(i % 2)) for i in (7, 0, 4, 3)]
    a, b = fast.read_batch(keys), slow.read_batch(keys)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(f is not None for f in fast._files.values()) and all(f is None for f in slow._files.values())
    packed = pack_images([np.arange(3, dtype=np.uint8), np.arange(5, dtype=np.uint8)], [True, False])
    encoded, flips = unpack_images(packed)
    assert [e.tolist() for e in encoded] == [[0, 1, 2], [0, 1, 2, 3, 4]] and flips.tolist() == [True, False]
    assert not packed  # the keys were taken out


def test_settings_and_missing_pieces_are_named(dataset, tmp_path):
    with pytest.raises(ConfigError, match="data.repa_features must be 'stored' or 'online'"):
        load_config([], ["data.path=x", "data.repa_features=live"])
    with pytest.raises(ConfigError, match="data.repa_features=online needs data.source=shards"):
        load_config(["configs/demo/digits.yaml"], ["data.repa_features=online"])
    stored_only = tmp_path / "stored"
    with shards.PartWriter(stored_only, 0) as w:
        w.write({"latents": np.zeros((4, 2, 2), np.float32), "latents_flip": np.zeros((4, 2, 2), np.float32),
                 "label": 0})
    shards.finalize(stored_only, {})
    with pytest.raises(ShardFormatError, match="no 'image' column: extract with images=true"):
        _open(stored_only, images=True)
    meta = json.loads((dataset / shards.META_FILE).read_text())
    with pytest.raises(ConfigError, match="set data.dino"):
        dataset_dino({k: v for k, v in meta.items() if k != "extraction"}, None, dataset)


def test_official_import_attaches_the_images(golden_dir, tree, tmp_path):
    """Official latents (4x4: 64 x 64 crops) with the images listed in their order: each sample gets the JPEG of
    its image's centre crop; images in another order (labels disagree) or of another count are refused."""
    from sfd_scale.data.official import import_official

    src = golden_dir / "latent_dataset_repa"  # 2 samples, labels 322 and 356
    files = list_inputs(tree).files
    listing = tmp_path / "list.txt"
    listing.write_text(f"{files[5].split(str(tree) + '/')[1]} 322\n{files[0].split(str(tree) + '/')[1]} 356\n")
    info = import_official(src, tmp_path / "imported", progress=False, images=tree, image_list=str(listing))
    assert "image" in info["columns"] and info["jpeg_quality"] == 95
    batch = _open(tmp_path / "imported", images=True).read_batch([(0, False), (1, True)])
    encoded, _ = unpack_images(batch)
    assert [e.tobytes() for e in encoded] == [jpeg_bytes(c, 95) for c in load_crops([files[5], files[0]], 64).numpy()]
    listing.write_text(listing.read_text().replace(" 356", " 355"))
    with pytest.raises(DataError, match=r"img0.jpg \(sample 1\) has label 355, the official sample 356"):
        import_official(src, tmp_path / "wrong", progress=False, images=tree, image_list=str(listing))
    with pytest.raises(DataError, match="8 images, but .* holds 2 samples"):
        import_official(src, tmp_path / "wrong", progress=False, images=tree)
    assert not (tmp_path / "wrong").exists()
