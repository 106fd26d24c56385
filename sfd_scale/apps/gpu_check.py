"""The GPU check of issue #14 in one command: golden parity on the device, bf16 vs fp32, attention kernels, keyed
draws, the SFD-XXL sweep, the official step, the checkpoint stall and the cost model's error, written to
``benchmarks/RESULTS.md`` (+ JSON). The checks are ``sfd_scale/bench/gpu_check.py``; in a checkout,
``bash tools/gpu_check.sh`` installs what the GPU image lacks and runs this command.

    sfd gpu-check --golden DIR --official-code DIR     # on one H100, <= 8 minutes
    sfd gpu-check --cpu-smoke                           # anywhere, tiny sizes, about a minute
"""
import os
import sys
from pathlib import Path

from ..cli import command_parser, entry_point


@entry_point
def main(argv=None) -> int:
    parser = command_parser("sfd gpu-check", __doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every CPU-capable step at tiny sizes (~1 min)")
    parser.add_argument("--golden", default=None, help="golden folder holding sfd_official/ (default: "
                                                       "$SFD_GOLDEN_DIR or ../shared/golden)")
    parser.add_argument("--official-code", default=None, help="the official SFD code's directory")
    parser.add_argument("--out", default="benchmarks/RESULTS.md")
    parser.add_argument("--json", default=None, help="default: --out with .json")
    args = parser.parse_args(argv)
    import json
    import platform
    import time

    import torch

    from ..bench.gpu_check import CHECKOUT, GPU_PLAN, SMOKE_PLAN, markdown, run_checks

    golden_root = Path(args.golden or os.environ.get("SFD_GOLDEN_DIR", CHECKOUT.parent / "shared" / "golden"))
    if args.cpu_smoke:
        plan, device = SMOKE_PLAN, torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (use --cpu-smoke on a machine without a GPU)", file=sys.stderr)
        return 2
    else:
        plan, device = GPU_PLAN, torch.device("cuda")
    started = time.perf_counter()
    results = run_checks(plan, device, golden_root / "sfd_official", args.official_code)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.machine()})"
    command = "bash tools/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"# GPU check{' (CPU smoke run: tiny sizes)' if args.cpu_smoke else ''}\n\n{name}, torch "
              f"{torch.__version__}, {time.perf_counter() - started:.0f} s in all.\n\nCommand: `{command}`")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(markdown(results, header))
    Path(args.json or Path(args.out).with_suffix(".json")).write_text(
        json.dumps({"command": command, "device": name, "torch": torch.__version__, "results": results}, indent=1,
                   default=str))
    failed = [k for k, r in results.items() if r.get("ok") is False]
    print(f"[gpu_check] wrote {args.out}; " + (f"FAILED: {', '.join(failed)}" if failed else "all ok"))
    return 1 if failed else 0

