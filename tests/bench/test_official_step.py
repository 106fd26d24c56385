"""The real official baseline: the official code imported from its path (and refused when another module
of the same name is in the way), its training step run in a fresh process from our initial weights, and the
paired ours / official comparison written as a results file. (Speed itself is a results file, not a test.)"""
import json
import sys
import types

import pytest

from sfd_scale.bench.official_step import import_official, run_isolated
from tools.benchmark import main

TINY = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2", "train.global_batch_size=4",
        "data.source=synthetic"]


def test_import_refuses_a_clashing_module(official_code, monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not look like the official SFD code"):
        import_official(tmp_path)
    fake = types.ModuleType("models")
    fake.__path__ = [str(tmp_path)]  # a package named "models" from elsewhere, imported first
    (tmp_path / "lightningdit.py").write_text("")
    monkeypatch.setitem(sys.modules, "models", fake)
    monkeypatch.setitem(sys.modules, "models.lightningdit", None)  # restored (or removed) after the test ...
    del sys.modules["models.lightningdit"]  # ... and absent during it, so the import finds the fake package
    with pytest.raises(ImportError, match="not from the official code"):
        import_official(official_code)


def test_official_step_trains_from_our_weights_in_its_own_process(official_code):
    result = run_isolated("official", ["configs/bench/cpu_small.yaml"], TINY + ["model.use_repa=true",
                          "train.precision=bf16"], steps=2, warmup=1, threads=1, compiled=False,
                          code_dir=str(official_code))
    assert len(result["step_s"]) == 2 and result["threads"] == 1 and result["device"] == "cpu"
    assert result["loss_first"] > 0 and result["loss_last"] > 0


def test_paired_run_writes_medians_and_ratio(official_code, tmp_path):
    rc = main(["--config", "configs/bench/cpu_small.yaml", "--official-code", str(official_code), "--paired", "1",
               "--compile-modes", "eager", "--steps", "1", "--warmup", "0", "--json", str(tmp_path / "p.json"),
               "--out", str(tmp_path / "p.md"), *TINY])
    assert rc == 0
    (result,) = json.loads((tmp_path / "p.json").read_text())["results"]
    (pair,) = result["pairs"]
    assert result["mode"] == "eager" and result["ratio_median"] == pair["ours"] / pair["official"]
    assert "| eager | 1 |" in (tmp_path / "p.md").read_text()
