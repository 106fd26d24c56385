"""The GPU check's CPU smoke run: every step that can run on a CPU (golden parity, bf16 vs fp32, attention,
keyed draws, the sweep with its checkpoint stall, the official step, the cost model's prediction) runs at
tiny sizes and writes its results file."""
import json

from tools.gpu_check import main


def test_cpu_smoke_writes_every_section(tmp_path, golden_dir, official_code):
    out = tmp_path / "RESULTS.md"
    rc = main(["--cpu-smoke", "--golden", str(golden_dir.parent), "--official-code", str(official_code),
               "--out", str(out)])
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert rc == 0, {k: r.get("error") for k, r in results.items()}
    assert results["golden_parity_fp32"]["max_rel_error"] <= 1e-5
    assert 0 < results["bf16_vs_fp32_loss"]["rel_diff"] <= 2e-2  # bf16 really ran, and agrees
    assert results["attention"]["sdpa_max_abs"] <= 2e-2
    assert len(results["sweep"]["rows"]) == 1 and results["sweep"]["rows"][0]["images_per_s"] > 0
    assert len(results["checkpoint_stall"]["blocking_s"]) == 2 and results["official_step"]["step_ms"] > 0
    assert results["keyed_draws"]["keys_equal"]  # on a CPU: CPU against itself, the code path runs
    assert results["cost_model"]["predicted_ms"] > 0 and results["cost_model"]["measured_ms"] > 0
    text = out.read_text()
    assert "## golden_parity_fp32: ok" in text and "## checkpoint_stall: ok" in text
