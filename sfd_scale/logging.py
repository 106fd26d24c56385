"""Run logging: wandb (offline by default: no login, no network) plus a console progress bar."""
from __future__ import annotations

import os
from typing import Optional

from tqdm.auto import tqdm


class RunLogger:
    def __init__(self, output_dir: str, mode: str, project: str, run_name: Optional[str], config: dict,
                 total_steps: int, initial_step: int, progress: bool, quiet: bool = False):
        self.run, self.quiet = None, quiet  # quiet: ranks other than 0 print nothing
        if mode != "disabled":
            import wandb

            os.makedirs(output_dir, exist_ok=True)
            self.run = wandb.init(project=project, name=run_name, dir=output_dir, mode=mode, config=config)
        self.bar = tqdm(total=total_steps, initial=initial_step, disable=not progress, dynamic_ncols=True,
                        desc="train")

    def log(self, step: int, metrics: dict) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)
        shown = {k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "loss_avg", "lr", "steps/s")}
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
        if not self.quiet:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
        if self.run is not None:
            self.run.finish()
