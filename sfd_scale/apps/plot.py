"""Draw a run's PNG plots (loss curves; FID vs. step when the run evaluated FID) from its metrics.jsonl.

    sfd plot runs/demo_digits [--out plots/]
"""
from ..cli import command_parser, entry_point


@entry_point
def main(argv=None) -> int:
    parser = command_parser("sfd plot", __doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a train.output_dir")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default: the run directory)")
    args = parser.parse_args(argv)
    from ..eval.plots import plot_run

    paths = plot_run(args.run_dir, args.out)  # no metrics.jsonl: a MissingInputError, one line
    print("\n".join(map(str, paths)))
    return 0
