"""Run logging: wandb (offline by default: no login, no network), a console progress bar, and two files
in the run directory that survive restarts: ``log.txt`` (what happened: starts, restarts, resumes,
checkpoints, signals) and ``metrics.jsonl`` (one line per logged step). A resumed run first cuts
``metrics.jsonl`` back to the step it resumes from, so the file reads as if the run had never stopped."""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from .atomic import write_text


def show_progress(setting: Optional[bool] = None, rank: Optional[int] = None) -> bool:
    """Whether a long task draws a tqdm progress bar (on stderr). Never on a rank other than 0 (``rank``; default
    the ``RANK`` environment variable of torchrun, srun or an extraction array); on rank 0 ``setting`` True forces
    it, False turns it off, and None (auto, the default of every command) draws it only when stderr is a
    terminal, so job logs and pipes get no bar redraws (training then logs one plain line per log step)."""
    if rank is None:
        rank = int(os.environ.get("RANK") or 0)
    if rank != 0 or setting is False:
        return False
    return bool(setting) or sys.stderr.isatty()


# what the console line (or the progress bar) shows of a metrics line, in this order; the rest is in
# metrics.jsonl and wandb
CONSOLE_COLUMNS = ("loss", "loss_avg", "images_per_s", "lr", "mfu")


class RunLogger:
    def __init__(self, output_dir: str, mode: str, project: str, run_name: Optional[str], config: dict,
                 total_steps: int, initial_step: int, progress: bool, quiet: bool = False):
        self.run, self.quiet = None, quiet  # quiet: ranks other than 0 print nothing and write no files
        self.dir = Path(output_dir)
        if not quiet:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._cut_metrics(initial_step)
        if mode != "disabled" and not quiet:
            import wandb

            id_file = self.dir / "wandb_run_id"  # one wandb run across restarts
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id)
            self.run = wandb.init(project=project, name=run_name, dir=output_dir, mode=mode, config=config,
                                  id=run_id, resume="allow")
        self.bar = tqdm(total=total_steps, initial=initial_step, disable=not progress, dynamic_ncols=True,
                        desc="train")

    def _cut_metrics(self, step: int) -> None:
        path = self.dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):  # the torn last line of a killed run
                pass
        write_text(path, "".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)
        if not self.quiet:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        shown = {k.replace("_per_s", "/s"): f"{metrics[k]:.4g}" for k in CONSOLE_COLUMNS if k in metrics}
        if "images_per_s" not in metrics and "steps/s" in metrics:  # runs that log no image rate (SemVAE)
            shown["steps/s"] = f"{metrics['steps/s']:.4g}"
        if self.quiet:
            return
        if self.bar.disable:  # batch jobs / CI: one plain line per log step instead of a bar
            print(f"step {step}: " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        else:
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def log_image(self, step: int, key: str, path: str) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(path)}, step=step)

    def write(self, line: str) -> None:
        """A line for the console and the run's ``log.txt``."""
        if not self.quiet:
            self.bar.write(line)
            with open(self.dir / "log.txt", "a") as f:
                f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")

    def close(self) -> None:
        self.bar.close()
        if self.run is not None:
            self.run.finish()
