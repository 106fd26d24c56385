"""Online vs stored REPA targets: bytes per training sample, loader samples/s on the CPU, predicted GPU time of
the online DINOv2 (``sfd_scale/bench/online_repa.py``):

    sfd bench-online-repa --work /tmp/online_repa_bench --out benchmarks/online_repa.md
"""
import json
import math
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from ..cli import command_parser, entry_point

COST_MODEL = Path("benchmarks") / "cost_model.json"  # default of --cost-model: a checkout's results file
STEP_RUN = "h100_xxl mb64"  # the training step the DINOv2 time is set against (per-rank micro-batch 64)


def _step_ms(cost_model: Path) -> float:
    """The cost model's predicted compiled H100 step of SFD-XXL at micro-batch 64 (``sfd cost-model``'s JSON)."""
    try:
        return json.loads(cost_model.read_text())["runs"][STEP_RUN]["prediction"]["compiled"]["step_s"] * 1e3
    except (OSError, KeyError, ValueError):
        return math.nan


def _bytes_section(cols: dict, n: int, resolution: int) -> list:
    from ..bench.online_repa import imagenet_arithmetic

    lines = [f"## Bytes per sample ({n} extracted photos at {resolution} x {resolution})", "",
             "| column | bytes per sample |", "|---|---|"]
    lines += [f"| `{k}` | {v:,.0f} |" for k, v in sorted(cols.items())]
    lines += ["", "ImageNet (1,281,167 images) with these sizes; a node = 8 H100s at 500 samples/s each "
              "(4,000/s):", "",
              "| targets | loader reads per sample (MB) | on disk per sample, both flips (MB) | dataset (GB) | "
              "node: loader reads (GB/s) | node: whole samples from storage (GB/s) |", "|---|---|---|---|---|---|"]
    for r in imagenet_arithmetic(cols):
        lines.append(f"| {r['mode']} | {r['read_per_sample_mb']:.3f} | {r['disk_per_sample_mb']:.3f} | "
                     f"{r['dataset_gb']:,.0f} | {r['node_read_gb_s']:.2f} | {r['node_storage_gb_s']:.2f} |")
    return lines + [""]


def _loader_section(root, args) -> list:
    from ..bench.online_repa import time_loader

    load = os.getloadavg()[0]
    lines = ["## Loader on the CPU", "", f"Load average when the loader section started: {load:.1f} on "
             f"{os.cpu_count()} cores (the machine is shared: samples/s scale down with it).", "",
             f"Per-rank batch {args.batch}; median of {args.repeats} measurements of "
             f"{args.batches} batches after 3 warm-up batches; page cache warm (the data was just written). Bytes: "
             "counted at the loader's positional reads while the training thread reads (0 readers); reader threads "
             "read the same bytes a few batches ahead of the timed window.", "",
             "| targets | readers | samples/s | bytes read per sample (counted) |", "|---|---|---|---|"]
    for online in (False, True):
        for workers in args.workers:
            runs = [time_loader(root, online, args.batch, args.batches, workers) for _ in range(args.repeats)]
            speed = statistics.median(r["samples_per_s"] for r in runs)
            what = "online: latents + JPEG, DALI CPU decode + flip" if online else "stored: latents + features"
            counted = f"{runs[0]['bytes_read_per_sample']:,.0f}" if workers == 0 else "-"
            lines.append(f"| {what} | {workers} | {speed:,.0f} | {counted} |")
            print(lines[-1], flush=True)
    return lines + [""]


def _gpu_section(batches, cost_model: Path) -> list:
    from ..bench.online_repa import dino_gpu_cost, gpu_share

    step = _step_ms(cost_model)
    lines = ["## Predicted H100 time of the online DINOv2 per step", "",
             "| per-rank batch | GFLOP per image | non-GEMM GB (eager) | kernels | eager ms | GEMM + attention "
             "floor ms | eager share of the SFD-XXL step |", "|---|---|---|---|---|---|---|"]
    for b in batches:
        c = dino_gpu_cost(b)
        share = gpu_share(c, step * b / 64)  # the step scales with the micro-batch
        lines.append(f"| {b} | {c['gflop_per_image']:.1f} | {c['non_gemm_gb']:.1f} | {c['kernels']} | "
                     f"{c['eager_ms']:.1f} | {c['floor_ms']:.1f} | {share * 100:.1f} % |")
    return lines + ["", f"SFD-XXL step: {step:.1f} ms predicted compiled at micro-batch 64 ({cost_model.name}, "
                        f"run '{STEP_RUN}'), scaled linearly to the other batch sizes.", ""]


@entry_point
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = command_parser("sfd bench-online-repa", __doc__.split("\n\n")[0])
    parser.add_argument("--work", default=None, help="folder for the photos and the dataset (default: a temp dir)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="reader threads")
    parser.add_argument("--gpu-batch", type=int, nargs="+", default=[32, 64], help="per-rank batches to price")
    parser.add_argument("--cost-model", type=Path, default=COST_MODEL,
                        help="sfd cost-model's JSON with the SFD-XXL step the DINOv2 time is set against")
    parser.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    args = parser.parse_args(argv)
    from ..bench.online_repa import column_bytes, extract_dataset, write_photo_tree

    work = Path(args.work or tempfile.mkdtemp(prefix="sfd_online_repa_"))
    tree = work / "photos"
    if not tree.is_dir():
        write_photo_tree(tree, args.images)
    root = extract_dataset(tree, work / "dataset", args.resolution)
    lines = [f"# Online vs stored REPA targets (CPU: {os.cpu_count()} cores, {platform.machine()}, local disk)", "",
             f"Command: `sfd bench-online-repa {' '.join(argv)}`", ""]
    lines += _bytes_section(column_bytes(root), args.images, args.resolution)
    lines += _loader_section(root, args)
    lines += _gpu_section(args.gpu_batch, args.cost_model)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0
