"""Run plots: loss curves and FID vs. step as PNGs from metrics.jsonl (torn lines tolerated)."""
import json

from PIL import Image

from sfd_scale.eval.plots import plot_fid, plot_run
from tools.plot_run import main


def _write_metrics(run, with_fid: bool):
    rows = [{"step": s, "loss": 1.0 / s, "loss_avg": 1.1 / s} for s in range(1, 30)]
    if with_fid:
        rows += [{"step": s, "fid": 300.0 / s} for s in (10, 20, 29)]
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 30, "lo')


def test_loss_and_fid_plots(tmp_path):
    _write_metrics(tmp_path / "run", with_fid=True)
    paths = plot_run(tmp_path / "run", tmp_path / "plots")
    assert [p.name for p in paths] == ["loss.png", "fid.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_without_fid_only_the_loss_plot_and_cli_errors(tmp_path, capsys):
    _write_metrics(tmp_path / "run", with_fid=False)
    assert main([str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "loss.png").is_file() and not (tmp_path / "run" / "fid.png").exists()
    assert main([str(tmp_path / "nothing")]) == 2 and "no metrics.jsonl" in capsys.readouterr().err
    assert plot_fid({"a": []}, tmp_path / "x.png") is None
