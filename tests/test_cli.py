"""The one error path of every tool (``cli.entry_point``): a problem the user can fix is one stderr line naming
the key / file / value and exit status 2, nothing half-written; ``--debug`` / ``SFD_DEBUG=1`` keep the traceback.
Start-up: a config typo is reported before anything heavy is imported; ``--print-config``; ``--help``'s keys."""
import json
import os
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from sfd_scale import cli
from sfd_scale.checkpoint_store import CheckpointError
from sfd_scale.cli import COMMON_KEYS, config_parser, entry_point
from sfd_scale.config import Config, ConfigError, load_config
from sfd_scale.errors import DataError, UserError


def _tool(error: BaseException):
    @entry_point
    def main(argv=None) -> int:
        assert "--debug" not in argv  # taken out before the tool parses its arguments
        raise error
    return main


def test_a_user_error_is_one_line_and_status_2(capsys, monkeypatch):
    monkeypatch.delenv("SFD_DEBUG", raising=False)
    assert _tool(ConfigError("train.max_steps must be >= 0, got -5\n(second line)"))(["x"]) == 2
    assert capsys.readouterr().err == "error: train.max_steps must be >= 0, got -5 (second line)\n"
    for kind in (CheckpointError, DataError, UserError):
        assert _tool(kind("a message"))([]) == 2
        assert capsys.readouterr().err == "error: a message\n"


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.delenv("SFD_DEBUG", raising=False)
    with pytest.raises(ConfigError, match="bad key"):
        _tool(ConfigError("bad key"))(["--debug", "a=1"])
    monkeypatch.setenv("SFD_DEBUG", "1")
    with pytest.raises(ConfigError, match="bad key"):
        _tool(ConfigError("bad key"))(["a=1"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv("SFD_DEBUG", raising=False)
    with pytest.raises(ZeroDivisionError):
        _tool(ZeroDivisionError("a bug"))([])


def test_ranks_other_than_0_say_which_rank_they_are(capsys, monkeypatch):
    monkeypatch.delenv("SFD_DEBUG", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _tool(DataError("shard file x is missing"))([]) == 2
    assert capsys.readouterr().err == "error: rank 1: shard file x is missing\n"
    monkeypatch.setenv("RANK", "0")
    assert _tool(DataError("shard file x is missing"))([]) == 2
    assert capsys.readouterr().err == "error: shard file x is missing\n"


# ----------------------------------------------------------------------------------------------- the tools' inputs
def _one_line(capsys) -> str:
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    return path


def test_convert_official_to_native_on_a_text_file(text_file, tmp_path, capsys):
    from tools import convert_checkpoint

    out = tmp_path / "converted"
    assert convert_checkpoint.main(["official-to-native", str(text_file), "--config", "configs/demo/digits.yaml",
                                    "--out", str(out)]) == 2
    line = _one_line(capsys)  # was "KeyError: 101"
    assert f"unreadable checkpoint {text_file}: not a torch.save archive, legacy torch file or safetensors" in line
    assert not out.exists()


def test_sample_with_a_missing_or_unreadable_checkpoint(text_file, tmp_path, capsys):
    from tools import sample

    assert sample.main([str(tmp_path / "nothing")]) == 2
    assert f"checkpoint not found: {tmp_path / 'nothing'}" in _one_line(capsys)
    assert sample.main([str(text_file), "--config", "configs/demo/digits.yaml"]) == 2
    assert f"unreadable checkpoint {text_file}" in _one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_eval_fid_with_a_missing_or_unreadable_batch(text_file, tmp_path, capsys):
    from tools import eval_fid

    assert eval_fid.main([str(tmp_path / "none.npz"), str(text_file)]) == 2
    assert f"{tmp_path / 'none.npz'}: no such file" in _one_line(capsys)
    assert eval_fid.main([str(text_file), str(text_file)]) == 2
    assert f"{text_file}: not a readable .npz file" in _one_line(capsys)


def test_study_with_a_missing_or_bad_study_file(text_file, tmp_path, capsys):
    from tools import study

    assert study.main([str(tmp_path / "none.yaml"), "--out", str(tmp_path / "s")]) == 2
    assert f"config file not found: {tmp_path / 'none.yaml'}" in _one_line(capsys)
    assert study.main([str(text_file), "--out", str(tmp_path / "s")]) == 2
    assert "bad key 'hello'" in _one_line(capsys)
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------------------------- start-up (#18)
REPO = Path(__file__).resolve().parents[1]
TYPO = ["--config", "configs/demo/digits.yaml", "optim.lrr=1"]
# what a config error or --print-config must not have imported (each takes seconds, megatron-core alone ~3 s)
HEAVY = ("torch", "megatron", "deepspeed", "nvidia.dali", "streaming", "wandb")


def _run_in_checkout(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("SFD_DEBUG", None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", [("tools/train.py",), ("-m", "sfd_scale", "train")], ids=["tool", "sfd"])
def test_a_config_typo_is_one_line_from_the_command(command):
    """The checkout's tool and ``python -m sfd_scale train`` (the installed ``sfd train``: tests/test_apps.py)."""
    started = time.perf_counter()
    done = _run_in_checkout(*command, *TYPO)
    elapsed = time.perf_counter() - started  # shown with -s; the measured times are in benchmarks/startup.md
    print(f"{' '.join(command)} with a config typo: exit {done.returncode} after {elapsed:.2f} s")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "error: command line: bad key 'optim.lrr': Key 'lrr' not in 'OptimConfig'. Did you mean: 'lr'?"]
    assert done.stdout == ""


def test_a_config_typo_and_print_config_import_nothing_heavy():
    """sys.modules when the typo's error has been reported, and after --print-config: none of ``HEAVY``."""
    script = f"""
import contextlib, io, json, sys
from tools.train import main
HEAVY = {HEAVY!r}
heavy = lambda: sorted(name for name in HEAVY if name in sys.modules)
status = main({TYPO!r})
after_typo = heavy()
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(["--config", "configs/demo/digits.yaml", "--print-config"])
    except SystemExit as done:
        printed = (done.code, len(out.getvalue()))
print(json.dumps([status, after_typo, printed, heavy()]))
"""
    done = _run_in_checkout("-c", script)
    assert done.returncode == 0, done.stderr
    status, after_typo, (print_status, printed_chars), after_print = json.loads(done.stdout.splitlines()[-1])
    assert status == 2 and "optim.lrr" in done.stderr
    assert after_typo == [], f"imported before the config error was reported: {after_typo}"
    assert print_status == 0 and printed_chars > 0
    assert after_print == [], f"imported by --print-config: {after_print}"


def test_print_config_loads_back_to_the_same_config(tmp_path, capsys):
    from tools import train as train_tool

    argv = ["--config", "configs/demo/digits.yaml", "train.max_steps=7", "sample.cfg_scale=1.5"]
    with pytest.raises(SystemExit) as done:
        train_tool.main([*argv, "--print-config"])
    assert done.value.code == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert load_config([str(printed)]) == load_config(["configs/demo/digits.yaml"], argv[2:])


def test_help_names_the_config_sections_and_keys_that_exist():
    schema = OmegaConf.structured(Config)
    for key in COMMON_KEYS:  # each names a leaf of the schema (a section would select a whole DictConfig)
        assert OmegaConf.select(schema, key, default=KeyError) is not KeyError, key
        assert not isinstance(OmegaConf.select(schema, key), DictConfig), key
    text = config_parser("a tool").format_help()
    assert "--print-config" in text
    assert all(f.name in text.split("config sections: ")[1].splitlines()[0] for f in fields(Config))
    assert all(f"  {key}=" in text for key in COMMON_KEYS)
    assert "  optim.lr=0.0001\n" in text and "  data.path=null\n" in text


def test_a_common_key_missing_from_the_schema_fails_the_help(monkeypatch):
    monkeypatch.setattr(cli, "COMMON_KEYS", cli.COMMON_KEYS + ("train.no_such_key",))
    with pytest.raises(KeyError, match="train.no_such_key"):
        cli.config_epilog()
