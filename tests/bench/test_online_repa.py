"""The online-REPA benchmark's arithmetic and GPU pricing (``sfd_scale/bench/online_repa.py``); its numbers are in
``benchmarks/online_repa.md``."""
import os
from collections import Counter

import pytest

from sfd_scale.bench.cost_model import ATTENTION_FLOPS, GEMM_FLOPS
from sfd_scale.bench.online_repa import counting_reads, dino_gpu_cost, imagenet_arithmetic

# one 256 x 256 sample: float32 latents and float16 features per flip, a 30 KB JPEG
COLUMNS = {"latents": 32768, "latents_flip": 32768, "latents_sv": 16384, "latents_sv_flip": 16384, "label": 8,
           "feats_dino": 393216, "feats_dino_flip": 393216, "image": 30000}


def test_imagenet_arithmetic():
    stored, online = imagenet_arithmetic(COLUMNS, samples=1000, per_node=100.0)
    assert stored["read_per_sample_mb"] == pytest.approx((32768 + 16384 + 8 + 393216) / 1e6)
    assert online["read_per_sample_mb"] == pytest.approx((32768 + 16384 + 8 + 30000) / 1e6)
    assert stored["disk_per_sample_mb"] == pytest.approx((sum(COLUMNS.values()) - 30000) / 1e6)
    assert online["disk_per_sample_mb"] == pytest.approx((sum(COLUMNS.values()) - 2 * 393216) / 1e6)
    assert online["dataset_gb"] == pytest.approx(online["disk_per_sample_mb"])  # 1000 samples
    assert stored["node_read_gb_s"] == pytest.approx(stored["read_per_sample_mb"] / 10)


def test_dino_gpu_cost_counts_a_vit_b_forward():
    """DINOv2-B/14 on 256 crops (resized to 224): 256 patches + CLS + 4 registers = 261 tokens; the counted FLOPs are
    exactly 2 x (the blocks' weight matrices) x 261 + the patch convolution over 256 patches + attention's
    QK^T and AV (12 layers, 2 x 2 x 261^2 x 768); the floor prices them at the cost model's rates, eager adds the
    non-GEMM traffic and launches."""
    one, four = dino_gpu_cost(1), dino_gpu_cost(4)
    assert one["params"] == 86_582_016
    blocks = 12 * (768 * 768 * 3 + 768 * 768 + 2 * 768 * 3072)  # qkv, proj, MLP
    conv, attention = 768 * 3 * 14 * 14, 12 * 4 * 261 ** 2 * 768
    assert one["gflop_per_image"] * 1e9 == pytest.approx(2 * blocks * 261 + 2 * conv * 256 + attention, rel=1e-12)
    assert four["gflop_per_image"] == pytest.approx(one["gflop_per_image"], rel=1e-12)  # linear in the batch
    floor = ((2 * blocks * 261 + 2 * conv * 256) / GEMM_FLOPS + attention / ATTENTION_FLOPS) * 1e3
    assert one["floor_ms"] == pytest.approx(floor, rel=1e-9) and four["floor_ms"] == pytest.approx(4 * floor, rel=1e-9)
    assert four["floor_ms"] < four["eager_ms"] < 4 * one["eager_ms"]  # launches do not grow with the batch


def test_counting_reads(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(100)))
    fd = os.open(path, os.O_RDONLY)
    try:
        with counting_reads(Counter()) as counter:
            os.pread(fd, 10, 5)
            os.preadv(fd, [bytearray(7)], 50)
        os.pread(fd, 10, 0)  # not counted after the block
    finally:
        os.close(fd)
    assert counter["bytes"] == 17
