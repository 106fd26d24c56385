"""The throughput benchmark runs end to end on CPU: a sweep, JSON + markdown, the FLOP formula's numbers, the
official-style step and the loader share with real data. (Speed itself is a results file, not a test.)"""
import json

from sfd_scale.config import load_config, model_args
from sfd_scale.models.flops import training_flops_per_image
from tools.benchmark import main

TINY = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "train.global_batch_size=8"]


def test_sweep_writes_json_and_markdown(tmp_path):
    rc = main(["--config", "configs/bench/cpu_small.yaml", "--steps", "1", "--warmup", "0", "--sweep",
               "train.activation_checkpointing=false,true", "--json", str(tmp_path / "b.json"), "--out",
               str(tmp_path / "b.md"), *TINY])
    assert rc == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["activation_checkpointing"] for r in rows] == [False, True]
    flops = training_flops_per_image(model_args(load_config(["configs/bench/cpu_small.yaml"], TINY)))
    for r in rows:
        assert r["gflop_per_image"] * 1e9 == flops and r["images_per_s"] > 0 and r["official_images_per_s"] > 0
        assert r["speedup_vs_official"] == r["images_per_s"] / r["official_images_per_s"]
        assert r["mfu"] is None and r["peak_memory_gb"] > 0  # no known peak on CPU
    assert "| 1 rank(s), activation_checkpointing=true | 1 |" in (tmp_path / "b.md").read_text()


def test_real_data_reports_the_loader_share(tmp_path):
    rc = main(["--config", "configs/bench/cpu_small.yaml", "--steps", "2", "--warmup", "1", "--data", "real",
               "--no-official", "--peak-tflops", "1.0", "--json", str(tmp_path / "b.json"), *TINY])
    row = json.loads((tmp_path / "b.json").read_text())["rows"][0]
    assert rc == 0 and 0 <= row["loader_share"] < 1 and "official_images_per_s" not in row
    assert row["mfu"] == row["tflops_per_device"] / 1.0


def test_forward_backward_mode_counts_flops(tmp_path):
    rc = main(["--mode", "fwd-bwd", "--count-flops", "--steps", "1", "--warmup", "0", "--micro-batch", "2",
               "--config", "configs/bench/cpu_small.yaml", "--json", str(tmp_path / "f.json"), *TINY])
    row = json.loads((tmp_path / "f.json").read_text())
    assert rc == 0 and row["micro_batch"] == 2 and abs(row["formula_vs_counted"] - 1) < 0.05
