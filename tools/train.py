"""Train an SFD model: ``python tools/train.py --config configs/demo/digits.yaml [key=value ...]``.

Exit status 0 when ``train.max_steps`` is reached; 75 (``REQUEUE_EXIT``) when the run stopped early on a
signal (``train.requeue_signals``) or its time budget, after writing a checkpoint: run the same command
again (slurm/ launchers requeue the job) and it continues from there.
"""
import sys

from sfd_scale.cli import config_parser, parse_config
from sfd_scale.train.trainer import Trainer, summary_text


def main(argv=None) -> int:
    _, cfg = parse_config(config_parser(__doc__.split("\n\n")[0]), argv)
    summary = Trainer(cfg).fit()
    print(summary_text(summary, cfg))
    return summary["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
