"""Plan a parallel layout: per-GPU memory of every TP x PP x DP layout of a model (``sfd_scale/bench/planner.py``):

    sfd plan --config bench/h100_xxl --gpus 8 --gpu-mem-gb 80 \
        [--micro-batch 32] [--gpus 16 --gpus 64 ...] [--fits-only] [--out benchmarks/planner_xxl.md] [key=value ...]

One markdown table per GPU count: weights, grads, optimizer state, EMA and activations (measured on the
meta device from the real model at the micro-batch) in GB per GPU, and whether the layout fits in
``--gpu-mem-gb``. ``--out`` appends the tables (with the command) to a markdown file.
"""
import sys
from pathlib import Path

from ..cli import config_parser, entry_point, parse_config


@entry_point
def main(argv=None) -> int:
    parser = config_parser(__doc__.split("\n\n")[0], prog="sfd plan")
    parser.add_argument("--gpus", type=int, action="append", required=True, help="GPU count (repeatable)")
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0, help="memory of one GPU, GB (1e9 bytes)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="samples per GPU per forward (default: the config's train.micro_batch_size, else 1)")
    parser.add_argument("--fits-only", action="store_true", help="list only the layouts that fit")
    parser.add_argument("--out", default=None, help="markdown file the tables are appended to")
    args, cfg = parse_config(parser, argv)
    from ..bench import planner  # after the config is checked (torch, megatron-core)

    command = "sfd plan " + " ".join(sys.argv[1:] if argv is None else argv)
    tables = []
    for gpus in args.gpus:
        result = planner.plan(cfg, gpus, args.gpu_mem_gb, args.micro_batch)
        if args.fits_only:
            result["rows"] = [r for r in result["rows"] if r["fits"]]
        tables.append(planner.markdown_table(result))
    text = f"`{command}`\n\n" + "\n\n".join(tables) + "\n"
    if args.out:
        with Path(args.out).open("a") as f:
            f.write("\n" + text)
    print(text)
    return 0

