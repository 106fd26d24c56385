"""Loader throughput: sfd_scale's streaming latent shards vs. a one-file-per-sample reader of the same data.

    python tools/bench_loader.py --work /tmp/loader_bench --out benchmarks/loader_cpu.md
"""
import argparse
import platform
import tempfile

from sfd_scale.data.loader_bench import benchmark

# what the training step consumes, for scale: the issue #7 target for SFD-XXL is 500 images/s per H100
CONSUMED = 500


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=None, help="folder for the synthetic data (default: a temp dir)")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--feature-samples", type=int, default=1024, help="samples of the run with DINOv2 features")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="sfd_loader_bench_")
    lines = [f"# Loader throughput ({platform.node() or 'this machine'}: CPU, local disk, warm page cache)", "",
             f"Command: `python tools/bench_loader.py {' '.join(argv) if argv else ''}`".replace(" `", "`"), "",
             f"Per-rank batch {args.batch}, {args.batches} timed batches after 2 warm-up batches. Both loaders "
             "return identical normalised batches (flip, SFD normalisation, labels, indices).", "",
             "| data | workers | loader | samples/s | ours / per-file | x what one H100 consumes (500/s) |",
             "|---|---|---|---|---|---|"]
    for feats, n in ((False, args.samples), (True, args.feature_samples)):
        for workers in args.workers:
            rows = benchmark(f"{work}/{'feats' if feats else 'latents'}", n, args.batch, workers, feats, args.batches)
            base = rows[0].samples_per_s
            for r in rows:
                ratio = r.samples_per_s / base
                lines.append(f"| {n} samples, {'latents + DINOv2 features' if feats else 'latents'} | {workers} | "
                             f"{r.loader} | {r.samples_per_s:,.0f} | {ratio:.2f} | {r.samples_per_s / CONSUMED:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
