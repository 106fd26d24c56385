"""Run logging: wandb offline keeps one run id across restarts; metrics.jsonl is cut back on resume; progress bars
are drawn on rank 0 only, when stderr is a terminal unless forced."""
import io
import json

from sfd_scale.logging import RunLogger, show_progress


def _logger(out, initial_step, mode="offline"):
    return RunLogger(str(out), mode, "sfd_scale_test", "t", {"a": 1}, total_steps=10, initial_step=initial_step,
                     progress=False)


def test_offline_wandb_run_survives_a_restart_and_metrics_are_cut(tmp_path):
    log = _logger(tmp_path, 0)
    for step in (1, 2, 3):
        log.log(step, {"loss": float(step)})
    log.write("hello")
    log.close()
    run_id = (tmp_path / "wandb_run_id").read_text()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # torn by a kill
    log = _logger(tmp_path, 2)  # resumed from step 2
    log.log(3, {"loss": 3.5})
    log.close()
    assert (tmp_path / "wandb_run_id").read_text() == run_id
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.5)]
    assert "hello" in (tmp_path / "log.txt").read_text()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_on_rank_0_and_a_terminal_unless_forced(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a pipe, a job log
    assert [show_progress(s) for s in (None, True, False)] == [False, True, False]
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert [show_progress(s) for s in (None, True, False)] == [True, True, False]
    monkeypatch.setenv("RANK", "1")  # torchrun's, srun's or an extraction array's
    assert [show_progress(s) for s in (None, True, False)] == [False, False, False]
    assert show_progress(None, rank=0) and not show_progress(True, rank=3)
