"""Train an SFD model: ``sfd train --config demo/digits [key=value ...]`` (``--config``: a path or a shipped config).

Exit status 0 when ``train.max_steps`` is reached; 75 (``REQUEUE_EXIT``) when the run stopped early on a
signal (``train.requeue_signals``) or its time budget, after writing a checkpoint: run the same command
again (slurm/ launchers requeue the job) and it continues from there. 2 for a problem to fix (config, data,
checkpoint, output directory, too many non-finite steps: one line on stderr says what; ``--debug`` shows the
traceback). Under torchrun use ``sfd torchrun ... -m sfd_scale train ...``, which keeps the status 75.
"""
from sfd_scale.cli import config_parser, entry_point, parse_config


@entry_point
def main(argv=None) -> int:
    _, cfg = parse_config(config_parser(__doc__.split("\n\n")[0], prog="sfd train"), argv)
    # the trainer (torch, megatron-core, DeepSpeed) is imported only once the config is known to be good
    from sfd_scale.train.trainer import Trainer, summary_text

    summary = Trainer(cfg).fit()
    print(summary_text(summary, cfg))
    return summary["exit_status"]

