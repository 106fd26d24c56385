"""Predict an H100 training step from counts taken on CPU (``sfd_scale/bench/cost_model.py``):

    sfd cost-model --config bench/h100_xxl [key=value ...] [--micro-batch 64] \
        [--device meta|cpu|auto] [--json benchmarks/cost_model.json] [--out benchmarks/cost_model.md] \
        [--baseline benchmarks/cost_model_before.json]

One run per call, stored in the ``--json`` file under ``--name`` (other runs already there are kept), and
``--out`` rewritten from all runs in it: each run's figures, beside those of the same run in
``--baseline`` when given (before / after). ``--device auto`` counts big models (over 200M parameters)
on meta, small ones on real CPU tensors.
"""
import json
import sys
from pathlib import Path

from ..cli import config_parser, entry_point, parse_config

HEADER = """# Cost model: predicted H100 training step from counts taken on CPU

Produced by `sfd cost-model` (`sfd_scale/bench/cost_model.py`, `sfd_scale/bench/dispatch_count.py`):
one training step (`Trainer.train_step`: draws, objective forward + backward, engine optimizer step, EMA
update) counted aten op by aten op, eager, on real CPU tensors or on the meta device; the training
forward explained by dynamo; one transformer block compiled by inductor (CPU) at micro-batch 2 and 4,
and the same block's forward and backward scheduled by inductor's Triton backend (fusion as on CUDA, no
kernel generated or run): the compiled prediction uses the Triton-scheduled figures ("compiled prediction
uses" says which), the C++ backend's stay beside them. The other modules compiled on CUDA (final layer,
REPA projector) are Triton-scheduled the same way, at the run's micro-batch.

Commands (rerun after merging; `--baseline` puts the before figures beside the new ones):

{commands}

Fixed constants (module-level in `cost_model.py`; they change only from a real GPU measurement):

| constant | value |
|---|---|
{constants}

Step time = GEMM FLOPs / GEMM rate + attention FLOPs / attention rate + activation non-GEMM bytes / 2.6 TB/s
+ optimizer and EMA bytes / 2.6 TB/s + 4 us x every kernel (GEMM, attention, non-GEMM); MFU = model FLOPs
(`sfd_scale/models/flops.py`) / (step time x 989 TF/s). Compiled: the non-GEMM kernels and bytes of the
blocks, the final layer and the REPA projector (what `train.compile` compiles) replaced by their
Triton-scheduled ones (GEMMs, attention and everything else, e.g. the embedders and the loss, stay eager).

Rules: a non-GEMM kernel is every aten op on the device that is not a view / alias / detach, an
allocation without a fill, or a metadata query; its bytes are its inputs + outputs (broadcast inputs
count their stored elements). Host-side ops (the trainer's CPU work) do not count on meta. Syncs:
`.item()` / `bool()` / `float()` of a device tensor, data-dependent shapes (`nonzero`, boolean-mask
indexing, `unique`, ...), device-to-host copies; the log step also reads its metrics on the host.
Per block: ops attributed to `blocks.i` (forward and backward) by torch's ModuleTracker (likewise to
`final_layer` and `repa_projector`); kernels per block are per micro-batch step, bytes per sample per block =
block bytes / micro-batch / depth.

"counted / formula model FLOPs" = the counted GEMM + attention FLOPs over `flops.py`'s 3x-forward model
FLOPs: above 1 because torch counts the fused attention backward as 2.5x its forward (QK^T recomputed),
slightly below by the input gradients no one needs (latents, time frequencies); the test checks both
exactly.

Known limits: inductor's CPU (C++) backend fuses differently from Triton on CUDA (a row norm is two loops
over the row; its own C++ kernel count is in the JSON); the Triton scheduling runs on CPU nodes presented
to the scheduler as CUDA ones (so the GPU-only fusions, mix-order reductions and loop reordering, apply),
at the run's micro-batch; it is still inductor's plan, not a CUDA measurement (autotuning and Triton's own
choices are not seen);
dynamo explains CPU tensors, so branches taken on CUDA only (e.g. flash-attn) are not explained;
the compiled block runs under CPU autocast, the eager count under CUDA autocast semantics
(`CudaAutocast`); on meta, data-dependent results are stand-ins (0, all-True masks); the launch cost is
added to every kernel, not overlapped; multi-tensor (foreach / fused) ops count CUDA's chunked launches.

## {results}
"""

AFTER = """
## After

Not yet measured: after merging the #14 branches, rerun each command above with
`--baseline benchmarks/cost_model_before.json` (the figures of this file, as shipped before the hot-path
changes); the tables then show before | after side by side.
"""


@entry_point
def main(argv=None) -> int:
    parser = config_parser(__doc__.split("\n\n")[0], prog="sfd cost-model")
    parser.add_argument("--micro-batch", type=int, default=None, help="per step (default: the config's)")
    parser.add_argument("--device", choices=("meta", "cpu", "auto"), default="auto")
    parser.add_argument("--no-compile", action="store_true", help="skip the inductor block (slow on CPU)")
    parser.add_argument("--name", default=None, help="run name in the JSON (default: config file stem + mb)")
    parser.add_argument("--json", default=None, help="JSON file of runs: this run is added / replaced")
    parser.add_argument("--out", default=None, help="markdown written from every run in --json")
    parser.add_argument("--baseline", default=None, help="JSON of runs to compare against (before)")
    args, cfg = parse_config(parser, argv)
    from ..bench import cost_model  # after the config is checked (torch, megatron-core)

    device = args.device
    if device == "auto":
        from ..config import model_args
        a = model_args(cfg)
        device = "meta" if a.depth * 12 * a.hidden_size ** 2 > cost_model.EXPLAIN_MAX_PARAMS else "cpu"
    result = cost_model.report(cfg, args.micro_batch, device, compile_block=not args.no_compile)
    stem = Path(args.config[-1]).stem if args.config else cfg.model.name
    name = args.name or f"{stem} mb{result['micro_batch']}"
    result["command"] = "sfd cost-model " + " ".join(sys.argv[1:] if argv is None else argv)
    runs = {name: result}
    if args.json:
        path = Path(args.json)
        runs = (json.loads(path.read_text())["runs"] if path.is_file() else {}) | runs
        path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    baseline = json.loads(Path(args.baseline).read_text())["runs"] if args.baseline else None
    tables = cost_model.markdown_tables(runs, baseline)
    if args.out:
        commands = "\n".join(f"    {r['command']}" for r in runs.values())
        constants = "\n".join(f"| {k} | {v:g} |" for k, v in cost_model.CONSTANTS.items())
        results = "Before / after" if baseline else "Before (the step as shipped before the #14 hot-path changes)"
        Path(args.out).write_text(HEADER.format(commands=commands, constants=constants, results=results) + "\n"
                                  + tables + ("" if baseline else AFTER))
    print(tables)
    return 0

