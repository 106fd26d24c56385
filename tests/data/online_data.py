"""A tiny dataset for online REPA targets, shared by the data, training and Semantic VAE tests: real photos
(scikit-image) extracted by the real extraction with tiny random encoders (64 x 64 crops -> 4 x 4 latents), with
both the stored DINOv2 features and the JPEG crops, so one dataset gives both kinds of targets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TINY_EXTRACT = str(REPO / "configs" / "extract" / "tiny_cpu.yaml")
IMAGES = 8  # 2 classes x 4 photos


def photo_tree(root) -> Path:
    """2 class folders x 4 photos: several sizes and aspect ratios, RGB and gray, JPEG and PNG."""
    from skimage import data

    astro = data.astronaut()
    arrays = {"a_cat": [data.chelsea(), data.coffee(), astro[::2, ::3], data.camera()],
              "b_dog": [astro, data.rocket(), astro[100:400, 50:300], data.coffee()[50:, 100:]]}
    root = Path(root)
    for cls, arrs in arrays.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(arrs):
            Image.fromarray(np.ascontiguousarray(a)).save(root / cls / f"img{i}.{'png' if i % 2 else 'jpg'}",
                                                          quality=95)
    return root


def extract_online(tree, out, *extra: str) -> Path:
    """The dataset: features and images, 3 parts of up to 3 samples, encoder batches of 2."""
    from sfd_scale.data.extract import extract, load_extract_config

    summary = extract(load_extract_config([TINY_EXTRACT], [f"input={tree}", f"output={out}", "images=true",
                                                           "features=true", "chunk_size=3", "batch_size=2",
                                                           "progress=false", *extra]), 0, 1)
    assert summary["finalized"] and summary["num_samples"] == IMAGES
    return Path(out)
