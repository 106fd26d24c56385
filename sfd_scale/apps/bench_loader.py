"""Loader throughput: sfd_scale's streaming latent shards vs. a one-file-per-sample reader of the same data.

    sfd bench-loader --work /tmp/loader_bench --out benchmarks/loader_cpu.md [--cold]
"""
import os
import platform
import statistics
import tempfile

from ..cli import add_progress_flag, command_parser, entry_point

# for scale: what one training GPU consumes at the issue #7 target for SFD-XXL (500 images/s per H100)
CONSUMED = 500


@entry_point
def main(argv=None) -> int:
    parser = command_parser("sfd bench-loader", __doc__.split("\n\n")[0])
    parser.add_argument("--work", default=None, help="folder for the synthetic data (default: a temp dir)")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--feature-samples", type=int, default=2048, help="samples of the run with DINOv2 features")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="parallel readers: DataLoader worker processes (baseline; ours for comparison) or "
                             "reader threads (ours); 0 reads in the consuming thread")
    parser.add_argument("--batches", type=int, default=100, help="timed batches per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per row (the median is shown)")
    parser.add_argument("--cold", action="store_true", help="also time with the page cache dropped (root, Linux)")
    parser.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    add_progress_flag(parser, "a bar over the measurements")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    from ..bench.loader import benchmark
    from ..logging import show_progress

    work = args.work or tempfile.mkdtemp(prefix="sfd_loader_bench_")
    lines = [f"# Loader throughput (CPU: {os.cpu_count()} cores, {platform.machine()}, local disk)", "",
             f"Command: `sfd bench-loader {' '.join(argv)}`", "",
             f"Per-rank batch {args.batch}; median of {args.repeats} measurements of {args.batches} batches, each "
             "after 4 warm-up batches. All loaders return identical normalised batches (flip, SFD normalisation, "
             "labels, indices). Warm: every file of the loader is read right before it is timed; cold: the page "
             "cache is dropped instead.", "",
             "| data | page cache | readers | loader | samples/s | ours / per-file | x one H100's need (500/s) |",
             "|---|---|---|---|---|---|---|"]
    rows = [(feats, n, cold, workers) for feats, n in ((False, args.samples), (True, args.feature_samples))
            for cold in ((False, True) if args.cold else (False,)) for workers in args.workers]
    bar = tqdm(total=len(rows) * args.repeats, desc="bench-loader", unit="run", dynamic_ncols=True,
               disable=not show_progress(args.progress))
    for feats, n, cold, workers in rows:
        kind = "latents + DINOv2 features" if feats else "latents"
        runs = []
        for _ in range(args.repeats):
            runs.append(benchmark(f"{work}/{'feats' if feats else 'latents'}_{n}", n, args.batch, workers, feats,
                                  args.batches, cold))
            bar.update()
        speeds = [statistics.median(run[i].samples_per_s for run in runs) for i in range(len(runs[0]))]
        for row, speed in zip(runs[0], speeds):
            lines.append(f"| {n} samples, {kind} | {'cold' if cold else 'warm'} | {workers} | {row.loader} | "
                         f"{speed:,.0f} | {speed / speeds[0]:.2f} | {speed / CONSUMED:.1f} |")
            print(lines[-1], flush=True)
    bar.close()
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0

