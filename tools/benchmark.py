"""Time training steps per layout on local ranks and write a results table.

    python tools/benchmark.py --config configs/bench/cpu_small.yaml --out benchmarks/cpu_layouts.md
"""
import argparse
import platform

import torch

from sfd_scale.train.benchmark import DEFAULT_LAYOUTS, benchmark, markdown


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[], metavar="YAML")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)
    rows = benchmark(DEFAULT_LAYOUTS, args.config, args.overrides, args.steps, args.warmup, args.threads_per_rank)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    text = markdown(rows, f"Step times on {device}, torch {torch.__version__}, {args.threads_per_rank} thread(s) "
                          f"per rank; config {' '.join(args.config)} {' '.join(args.overrides)}; mean of "
                          f"{args.steps} steps after {args.warmup} warm-up steps.")
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
