"""Checkpoint conversion: official <-> native round trips are exact, converted weights reproduce the golden
forward, single-file export, DeepSpeed ZeRO-3 -> native, and mismatched configs are refused."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfd_scale.config import load_config
from sfd_scale.models.official import read_checkpoint
from sfd_scale import checkpoint_store as store
from sfd_scale.train import convert
from tests import golden

ROOT = Path(__file__).resolve().parents[2]


def golden_overrides(golden_dir) -> list:
    """Config keys for the golden set's main model (its official constructor arguments)."""
    kw = golden.config(golden_dir)["models"]["main"]["kwargs"]
    sem = kw["semantic_chans"]
    return [f"model.hidden_size={kw['hidden_size']}", f"model.depth={kw['depth']}",
            f"model.num_heads={kw['num_heads']}", f"model.patch_size={kw['patch_size']}",
            f"model.input_size={kw['input_size']}",
            f"model.num_classes={kw['num_classes']}", f"model.use_repa={kw['use_repa']}",
            f"model.repa_projector_dim={kw['repa_projector_dim']}", f"model.repa_depth={kw['repa_depth']}",
            f"sfd.texture_chans={kw['in_channels'] - sem}", f"sfd.semantic_chans={sem}",
            f"sfd.delta_t={kw['semfirst_delta_t']}"]


def golden_config(golden_dir, *extra):
    return load_config(["configs/demo/digits.yaml"], golden_overrides(golden_dir) + list(extra))


def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


def test_official_to_native_to_official_is_exact_and_keeps_the_golden_forward(golden_dir, tmp_path):
    src = golden_dir / golden.config(golden_dir)["models"]["main"]["weights_file"]
    original = read_checkpoint(src)
    native = convert.official_to_native(src, golden_config(golden_dir), tmp_path / "run", step=7)
    assert native == tmp_path / "run" / "checkpoints" / "step_0000007"
    assert store.read_object(native, "trainer")["step"] == 7
    out = convert.native_to_official(native, tmp_path / "back.pt")
    container = torch.load(out, weights_only=True)
    same(container["ema"], original)
    same(container["model"], original)
    # what the official inference.py does: the 'ema' entry, strict load, eval forward
    model, spec = golden.build(golden_dir)
    model.load_state_dict(read_checkpoint(native, "ema"), strict=False)
    g = golden.tensors(golden_dir, golden.config(golden_dir)["models"]["main"]["forward_file"])
    with torch.no_grad():
        assert golden.max_err(model(g["x"], golden.model_time(spec, g), g["y"]), g["out_eval"]) <= golden.FORWARD_TOL


def test_native_to_safetensors_in_a_chosen_dtype(golden_dir, tmp_path):
    from safetensors.torch import load_file

    src = golden_dir / "weights.safetensors"
    native = convert.official_to_native(src, golden_config(golden_dir), tmp_path / "run")
    path = convert.native_to_safetensors(native, tmp_path / "ema.safetensors", "ema", "bf16")
    same(load_file(str(path)), {k: v.to(torch.bfloat16) for k, v in read_checkpoint(src).items()})


def test_mismatched_config_is_refused_and_nothing_is_written(golden_dir, tmp_path):
    with pytest.raises(ValueError, match="does not fit model .*(missing|unexpected|shape)"):
        convert.official_to_native(golden_dir / "weights.safetensors", golden_config(golden_dir, "model.depth=3"),
                                   tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_command_line(golden_dir, tmp_path):
    cmd = [sys.executable, "tools/convert_checkpoint.py"]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    run = subprocess.run(cmd + ["official-to-native", str(golden_dir / "weights.safetensors"), "--config",
                                "configs/demo/digits.yaml", "--out", str(tmp_path / "run"),
                                *golden_overrides(golden_dir)],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    native = Path(run.stdout.strip().splitlines()[-1])
    run = subprocess.run(cmd + ["native-to-official", str(native), "--out", str(tmp_path / "x.pt")], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0 and (tmp_path / "x.pt").is_file(), run.stderr[-2000:]
    run = subprocess.run(cmd + ["native-to-official", str(tmp_path / "nope"), "--out", str(tmp_path / "y.pt")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "nope" in run.stderr and not (tmp_path / "y.pt").exists()
