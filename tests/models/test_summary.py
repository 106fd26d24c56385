"""``sfd_scale.models.summary`` and its thin CLI ``tools/model_summary.py``."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from sfd_scale.config import load_config, model_args
from sfd_scale.models.lightningdit import count_parameters
from sfd_scale.models.summary import build_meta, cli_args, format_table, summarize

TOOL = Path(__file__).resolve().parents[2] / "tools" / "model_summary.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("model_summary_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the __main__ guard keeps this from running the CLI
    return module


def run(tool, capsys, *argv):
    rc = tool.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plain_xl(tool, capsys):
    rc, out, _ = run(tool, capsys, "LightningDiT-XL/1", "--in-channels", "32", "--no-repa", "--plain")
    assert rc == 0
    assert "675.26 M  (675,260,768)" in out and "plain (single time embedding)" in out
    assert "REPA projector       - (off)" in out
    for row in ("depth                28", "hidden               1152", "heads (head dim)     16 (72)",
                "tokens               256 (16 x 16)", "in channels          32", "out channels         32"):
        assert row in out


def test_sfd_xxl(tool, capsys):
    rc, out, _ = run(tool, capsys, "LightningDiT-XXL/1", "--in-channels", "48", "--semantic-chans", "16",
                     "--repa-projector-dim", "2048")
    assert rc == 0
    assert "1037.19 M" in out and "48 (32 texture + 16 semantic)" in out and "SFD (dual time embedding), REPA" in out


def test_config_with_overrides(tool, capsys, tmp_path):
    yaml = tmp_path / "x.yaml"
    yaml.write_text("model: {name: LightningDiT-B/1, use_repa: true}\ndata: {source: demo}\n")
    overrides = ["model.depth=2", "sfd.semantic_chans=8"]
    rc, out, _ = run(tool, capsys, "--config", str(yaml), *overrides)
    assert rc == 0
    expected = count_parameters(build_meta(model_args(load_config([str(yaml)], overrides))))
    assert f"({expected:,})" in out and "40 (32 texture + 8 semantic)" in out and "overridden" in out


def test_cli_errors(tool, capsys, tmp_path):
    rc, _, err = run(tool, capsys, "LightningDiT-Q/1")
    assert rc == 2 and "unknown model name 'LightningDiT-Q/1'" in err
    rc, _, err = run(tool, capsys, "LightningDiT-S/1", "--semantic-chans", "48")
    assert rc == 2 and "channel split does not add up" in err
    yaml = tmp_path / "x.yaml"
    yaml.write_text("data: {source: demo}\n")
    with pytest.raises(SystemExit):  # model flags next to a config would be silently ignored
        tool.main(["--config", str(yaml), "--no-repa"])
    assert "do not combine with --config" in capsys.readouterr().err


def test_cli_args_channel_rules():
    args, spec = cli_args("LightningDiT-S/1", in_channels=48, semantic_chans=0)
    assert not args.dual_time_embed and spec.semantic_chans == 0  # official: no semantic part -> one embedder
    args, spec = cli_args("LightningDiT-S/1", in_channels=48)
    assert args.dual_time_embed and spec is None
    with pytest.raises(ValueError, match="plain model has no semantic channels"):
        cli_args("LightningDiT-S/1", semantic_chans=16, plain=True)


def test_parts_add_up_and_table_rows():
    args, spec = cli_args("LightningDiT-S/2", in_channels=48, semantic_chans=16, learn_sigma=True, wo_shift=True)
    s = summarize(args, "LightningDiT-S/2", spec)
    assert sum(s.part_total(p) for p in s.parts) == s.total == count_parameters(build_meta(args))
    assert s.total - s.trainable == 64 * 384  # only the frozen pos_embed (T = 64 at patch 2)
    table = format_table(s)
    assert "tokens               64 (8 x 8)" in table and "96 (learn_sigma" in table


def test_script_runs_as_main():
    """`python tools/model_summary.py --help` from a checkout (argument parsing only, so it is quick)."""
    done = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--semantic-chans" in done.stdout
