"""Training throughput: images/s, step time, model FLOPs, MFU, peak memory, loader share, and the ratio to an
official-style training step of the same model, for one setting or a sweep (``sfd_scale/bench/throughput.py``).

    sfd bench --config bench/cpu_small --layouts cpu --out benchmarks/cpu_layouts.md
    sfd bench --config experiments/sfd_xxl --sweep train.micro_batch_size=32,64 \\
        --sweep train.activation_checkpointing=false,true --json xxl.json train.precision=bf16 model.use_repa=true
    sfd bench --mode fwd-bwd --count-flops --config experiments/sfd_xxl \\
        data.path=unused model.use_repa=true         # one XXL forward/backward, e.g. on a CPU
    sfd bench --config bench/cpu_small --official-code \\
        ../shared/reference/sfd-official-cde82a6 --paired 5 --out benchmarks/official_step_cpu.md \\
        --json benchmarks/official_step_cpu.json     # ours vs the REAL official step, eager and compiled

Without ``--official-code`` the "official" column is an official-style eager stand-in (labelled so).
"""
import json
import sys

from ..cli import command_parser, entry_point


@entry_point
def main(argv=None) -> int:
    parser = command_parser("sfd bench", __doc__.split("\n\n")[0], run_config=True)
    parser.add_argument("--config", action="append", default=[], metavar="YAML")
    parser.add_argument("--mode", choices=("step", "fwd-bwd"), default="step",
                        help="step: full training steps (default); fwd-bwd: the model's forward + backward only")
    parser.add_argument("--micro-batch", type=int, default=1, help="images per forward/backward (--mode fwd-bwd)")
    parser.add_argument("--count-flops", action="store_true", help="--mode fwd-bwd: also count with torch's counter")
    parser.add_argument("--layouts", choices=("one", "cpu"), default="one",
                        help="one: a single process (default); cpu: the six CPU layouts of benchmarks/cpu_layouts.md")
    parser.add_argument("--ranks", type=int, default=1, help="ranks of the single setting (--layouts one)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="run every value of a config key (repeatable: all combinations)")
    parser.add_argument("--data", choices=("synthetic", "real"), default="synthetic",
                        help="synthetic: one random batch reused (the step alone); real: the run's loader")
    parser.add_argument("--no-official", action="store_true", help="skip the official step")
    parser.add_argument("--official-code", default=None, metavar="DIR",
                        help="the official SFD code (e.g. ../shared/reference/sfd-official-cde82a6): time its real "
                             "training step instead of the eager stand-in")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="with --official-code: N pairs of (ours, official), each a fresh 1-process run with "
                             "--threads-per-rank threads, for every --compile-modes mode; medians and median ratio")
    parser.add_argument("--compile-modes", default="eager,compiled", help="--paired: eager, compiled or both")
    parser.add_argument("--checkpoint", action="store_true",
                        help="also time two saves of the full training state (blocking part, background write)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    parser.add_argument("--out", default=None, help="markdown file to write")
    parser.add_argument("--json", default=None, help="JSON file to write (all fields)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    axes = {}
    for item in args.sweep:
        key, _, values = item.partition("=")
        if not key or not values:
            parser.error(f"--sweep wants KEY=V1,V2,..., got {item!r}")
        axes[key] = values.split(",")
    from ..config import load_config

    load_config(args.config, overrides)  # a ConfigError: one line, exit 2 (entry_point), before torch
    if args.mode == "fwd-bwd":
        return _forward_backward(args, overrides)
    if args.paired:
        if not args.official_code:
            parser.error("--paired needs --official-code DIR")
        return _paired(args, overrides, argv)
    import torch

    from ..bench.throughput import CPU_LAYOUTS, Setting, benchmark, device_name, markdown, sweep

    base = CPU_LAYOUTS if args.layouts == "cpu" else [Setting(f"{args.ranks} rank(s)", args.ranks)]
    rows = benchmark(sweep(base, axes), args.config, overrides, args.steps, args.warmup, args.data == "synthetic",
                     not args.no_official, args.threads_per_rank, args.peak_tflops, args.official_code,
                     args.checkpoint)  # a ConfigError: one line, exit 2 (entry_point)
    command = _command(argv)
    text = markdown(rows, f"Training throughput on {device_name()}, torch {torch.__version__}, "
                          f"{args.threads_per_rank} thread(s) per rank, {args.data} data; mean of {args.steps} steps "
                          f"after {args.warmup} warm-up steps.\n\nCommand: `{command}`")
    return _write(args, text, {"command": command, "rows": rows})


def _command(argv) -> str:
    return "sfd bench " + " ".join(argv if argv is not None else sys.argv[1:])


def _write(args, text: str, data: dict) -> int:
    """Print the markdown, write it to --out and the data to --json."""
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    return 0


def _paired(args, overrides, argv) -> int:
    import torch

    from ..bench.official_step import paired, paired_markdown
    from ..bench.throughput import device_name

    modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    if not modes or set(modes) - {"eager", "compiled"}:
        print(f"--compile-modes wants eager and/or compiled, got {args.compile_modes!r}", file=sys.stderr)
        return 2
    results = [paired(args.config, overrides, args.official_code, args.paired, args.steps, args.warmup,
                      args.threads_per_rank, mode == "compiled") for mode in modes]
    command = _command(argv)
    text = paired_markdown(results, f"Ours vs the official SFD training step on {device_name()}, torch "
                                    f"{torch.__version__}, {args.threads_per_rank} thread(s), 1 process, synthetic "
                                    f"batch reused; each run a fresh process: median of {args.steps} steps after "
                                    f"{args.warmup} warm-up steps; {args.paired} pairs, alternating which goes first."
                                    f"\n\nCommand: `{command}`")
    return _write(args, text, {"command": command, "device": device_name(), "torch": torch.__version__,
                               "results": results})


def _forward_backward(args, overrides) -> int:
    import torch

    from ..bench.throughput import forward_backward
    from ..config import load_config

    cfg = load_config(args.config, overrides)
    torch.set_num_threads(max(args.threads_per_rank, torch.get_num_threads()))
    row = forward_backward(cfg, args.micro_batch, args.steps, args.warmup, args.count_flops, args.peak_tflops)
    row["command"] = "sfd bench " + " ".join(sys.argv[1:])
    print(json.dumps(row, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    return 0

