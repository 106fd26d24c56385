"""The one error path of every tool (``cli.entry_point``): a problem the user can fix is one stderr line naming
the key / file / value and exit status 2, nothing half-written; ``--debug`` / ``SFD_DEBUG=1`` keep the traceback."""
import pytest

from sfd_scale.checkpoint_store import CheckpointError
from sfd_scale.cli import entry_point
from sfd_scale.config import ConfigError
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
