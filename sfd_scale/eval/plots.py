"""PNG plots of a run: loss curves and FID vs. training progress, from the run's ``metrics.jsonl``
(one JSON line per logged step, written by ``logging.RunLogger``). Sample grids are PNGs already
(``<run>/samples/``). matplotlib with the Agg backend: no display needed."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from ..errors import MissingInputError  # noqa: E402


def read_metrics(run_dir: str | Path) -> List[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise MissingInputError(f"no metrics.jsonl in {run_dir} (is it a train.output_dir?)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn last line of a killed run
            pass
    return rows


def _series(rows: Sequence[dict], key: str):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_loss(rows: Sequence[dict], path: str | Path, title: str = "training loss") -> Optional[Path]:
    """Loss per logged step and its running average over each logging window; None without losses."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    drawn = False
    for key, style in (("loss", dict(alpha=0.35, lw=0.8)), ("loss_avg", dict(lw=1.6))):
        x, y = _series(rows, key)
        if x:
            ax.plot(x, y, label=key, **style)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_fid(curves: Dict[str, Sequence[tuple]], path: str | Path, x_label: str = "step",
             title: str = "FID (EMA weights)") -> Optional[Path]:
    """One curve per name: points (x, fid); log-scale FID as in the paper's convergence plots."""
    curves = {k: sorted(v) for k, v in curves.items() if v}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    ax.set(xlabel=x_label, ylabel="FID", title=title)
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def plot_run(run_dir: str | Path, out_dir: Optional[str | Path] = None) -> List[Path]:
    """``loss.png`` and, when the run logged FID, ``fid.png`` into ``out_dir`` (default: the run dir)."""
    rows = read_metrics(run_dir)
    out = Path(out_dir or run_dir)
    written = [plot_loss(rows, out / "loss.png", title=f"training loss: {Path(run_dir).name}")]
    x, y = _series(rows, "fid")
    written.append(plot_fid({Path(run_dir).name: list(zip(x, y))}, out / "fid.png"))
    return [p for p in written if p is not None]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
