"""A cost model of one training step that runs without a GPU: count it, then predict an H100's step time.

``count_step`` builds the real ``Trainer`` (synthetic data, one micro-batch per step, eager) on real CPU
tensors or on the meta device (big models: never materialised) and runs ``Trainer.train_step`` (draws,
objective forward + backward, engine optimizer step, EMA update) under ``dispatch_count.OpCounter``:
GEMM / attention FLOPs, non-GEMM kernels and bytes (total, per phase, per block), host-device syncs
with their callers. The first step warms up (optimizer state); the second is counted; the third is a
log step (its metrics are read on the host, as the run logger does) and gives the syncs of a log step.
The forward runs under ``CudaAutocast`` (CUDA autocast semantics on any device) and on meta the
optimizer runs as it would on CUDA (fused AdamW when ``optim.fused`` allows it).

``graph_breaks`` asks ``torch._dynamo.explain`` about the training forward at TP = 1 (on real CPU
tensors; a model over ``EXPLAIN_MAX_PARAMS`` keeps its width, heads and tokens at depth 2).
``compiled_block`` compiles one real transformer block with inductor (CPU) at micro-batch 2 and 4 and
reads the kernels and bytes of the generated code from inductor's scheduler (the same sum as inductor's
``num_bytes_accessed``, which is only filled when its metrics log is on), split into GEMM / attention
(extern kernels) and the rest. Inductor's C++ backend fuses differently from Triton on CUDA (a row norm
is a reduction loop plus a pointwise loop, each reading the row), so ``triton_scheduled_block`` also
lowers the block's forward and backward with the Triton backend's scheduling, as for CUDA nodes and at the
run's micro-batch (at trace time, no kernel generated or run) and the prediction uses its fused nodes (one Triton kernel each on CUDA), the C++
figures kept beside them (and used when Triton scheduling fails).

``predict`` turns counts into an H100 step time and MFU with the fixed constants below, eager and with
the blocks compiled (block non-GEMM figures replaced by ``compiled_block``'s, the rest eager).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import tempfile
from unittest import mock
from collections import Counter
from typing import Dict, Optional

import torch
import torch._functorch.config
import torch._inductor.config

from ..config import Config, model_args
from ..models.flops import training_flops_per_image
from ..models.lightningdit import LightningDiT, LightningDiTBlock, ModelArgs, parallel_config
from ..models.embeddings import Rope2D
from ..parallel.layout import tensor_parallel_size
from ..parallel.engines.base import adam_state, fused_adamw
from .dispatch_count import CudaAutocast, OpCounter
from .step_io import StepWindow
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.module_tracker import ModuleTracker

# ----------------------------------------------------------------------------------------------- constants
# H100 SXM figures for the prediction. FIXED: change them only from a real GPU measurement (and say which
# in benchmarks/cost_model.md), never to make a prediction fit.
H100_PEAK_FLOPS = 989e12        # dense bf16 tensor-core peak: the MFU denominator
GEMM_FLOPS = 692e12             # 70 % of the peak, sustained by large bf16 GEMMs
ATTENTION_FLOPS = 495e12        # flash attention forward + backward (50 % of the peak)
NON_GEMM_BYTES_PER_S = 2.6e12   # elementwise / reduction kernels: ~80 % of 3.35 TB/s HBM3
OPTIMIZER_BYTES_PER_S = 2.6e12  # optimizer step and EMA update (multi-tensor kernels), same bandwidth
LAUNCH_S = 4e-6                 # per kernel (launch + tail), added to every kernel counted
EXPLAIN_MAX_PARAMS = 200e6      # bigger models: explain a depth-2 model of the same width

CONSTANTS = {"h100_peak_flops": H100_PEAK_FLOPS, "gemm_flops": GEMM_FLOPS, "attention_flops": ATTENTION_FLOPS,
             "non_gemm_bytes_per_s": NON_GEMM_BYTES_PER_S, "optimizer_bytes_per_s": OPTIMIZER_BYTES_PER_S,
             "launch_s": LAUNCH_S}


def counting_config(cfg: Config, micro_batch: int, output_dir: str) -> Config:
    """``cfg`` for counting: one micro-batch of ``micro_batch`` per step, synthetic data, eager, no resume."""
    r = dataclasses.replace
    return r(cfg, train=r(cfg.train, global_batch_size=micro_batch, micro_batch_size=micro_batch, compile=False,
                          output_dir=output_dir, sample_every=0),
             data=r(cfg.data, source="synthetic", num_workers=0), checkpoint=r(cfg.checkpoint, resume=False))


def default_micro_batch(cfg: Config) -> int:
    return cfg.train.micro_batch_size or cfg.train.global_batch_size


# ----------------------------------------------------------------------------------------------- eager count
@contextlib.contextmanager
def _phases(counter: OpCounter, trainer):
    """Attribute the trainer's input preparation, optimizer step (with clipping) and EMA update."""
    def wrap(fn, phase):
        def wrapped(*a, **kw):
            with counter.in_phase(phase):
                return fn(*a, **kw)
        return wrapped

    saved = {"step_inputs": trainer.step_inputs}
    trainer.step_inputs = wrap(trainer.step_inputs, "inputs")
    ema_update = trainer.ema.update
    trainer.ema.update = wrap(ema_update, "ema")
    clip = torch.nn.utils.clip_grad_norm_

    def clip_as_on_cuda(*a, **kw):
        """On meta, the multi-tensor norm and scaling torch picks on CUDA (it refuses foreach on meta)."""
        if counter.device.type != "meta":
            return clip(*a, **kw)
        with mock.patch("torch.nn.utils.clip_grad._device_has_foreach_support", lambda device: True):
            return clip(*a, **({"foreach": True} | kw))

    torch.nn.utils.clip_grad_norm_ = wrap(clip_as_on_cuda, "optimizer")
    stack = []
    hooks = [register_optimizer_step_pre_hook(
                 lambda *a: stack.append(counter.in_phase("optimizer")) or stack[-1].__enter__()),
             register_optimizer_step_post_hook(lambda *a: stack.pop().__exit__(None, None, None))]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        torch.nn.utils.clip_grad_norm_ = clip
        trainer.step_inputs = saved["step_inputs"]
        trainer.ema.update = ema_update


def build_counting_trainer(cfg: Config, device: torch.device):
    from .trainer import Trainer

    trainer = Trainer(cfg, device=device)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
    trainer.engine.forward_precision = lambda: CudaAutocast(dtype)
    optimizer = getattr(trainer.engine, "optimizer", None)
    if device.type == "meta" and isinstance(optimizer, torch.optim.Optimizer):
        # the implementation the engine picks on CUDA; the state is made here, as torch makes it, because
        # torch's check before a fused optimizer's first step rejects meta tensors
        for group in optimizer.param_groups:
            if "fused" in group:
                group["fused"] = fused_adamw(cfg, torch.device("cuda"))
                group["foreach"] = None if group["fused"] else True
                for p in group["params"]:
                    adam_state(optimizer, p, 0)
    return trainer


def _summary(counter: OpCounter, micro_batch: int, depth: int) -> dict:
    phases: Dict[str, Counter] = {}
    blocks, block_ids = Counter(), set()
    for (phase, block), c in counter.totals.items():
        phases.setdefault(phase, Counter()).update(c)
        if block is not None:
            blocks.update(c)
            block_ids.add(block)
    total = sum(phases.values(), Counter())
    out = {k: int(total[k]) for k in ("gemm_flops", "attention_flops", "gemm_kernels", "attention_kernels")}
    out["non_gemm"] = {p: {"kernels": int(c["kernels"]), "bytes": int(c["bytes"])} for p, c in sorted(phases.items())}
    out["non_gemm_total"] = {"kernels": int(total["kernels"]), "bytes": int(total["bytes"])}
    out["blocks"] = {"count": len(block_ids), "kernels": int(blocks["kernels"]), "bytes": int(blocks["bytes"]),
                     "gemm_flops": int(blocks["gemm_flops"]), "attention_flops": int(blocks["attention_flops"]),
                     "kernels_per_block": blocks["kernels"] / depth,
                     "bytes_per_sample_per_block": blocks["bytes"] / micro_batch / depth}
    out["top_ops"] = dict(counter.ops.most_common(25))
    return out


def _syncs(counter: OpCounter) -> dict:
    return {"count": sum(counter.syncs.values()),
            "where": [{"op": op, "where": where, "count": n} for (op, where), n in counter.syncs.most_common()]}


def count_step(cfg: Config, micro_batch: Optional[int] = None, device: str = "meta") -> dict:
    """Counts of one eager training step of ``cfg`` at ``micro_batch`` on ``device`` (``meta`` or ``cpu``)."""
    micro_batch = micro_batch or default_micro_batch(cfg)
    device = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = counting_config(cfg, micro_batch, tmp)
        trainer = build_counting_trainer(cfg, device)
        batches = iter(trainer.loader())
        with OpCounter(device):  # warm-up step: optimizer state created (on meta: syncs answered)
            trainer.train_step(next(batches))
        tracker = ModuleTracker()
        counter = OpCounter(device, tracker)
        with tracker, counter, _phases(counter, trainer):
            trainer.train_step(next(batches))
        log = OpCounter(device)
        with log, _phases(log, trainer):
            window = StepWindow()  # the trainer's own log-step read of the interval's device metrics
            window.add(trainer.step, trainer.train_step(next(batches)))
            window.settle()
    args = model_args(cfg)
    out = {"device": device.type, "micro_batch": micro_batch, "depth": args.depth,
           "params": sum(p.numel() for p in trainer.model.parameters()),
           "model_flops": training_flops_per_image(args) * micro_batch,
           "precision": cfg.train.precision, "engine": cfg.parallel.engine}
    out.update(_summary(counter, micro_batch, args.depth))
    step, log_step = _syncs(counter), _syncs(log)
    every = max(cfg.train.log_every, 1)
    out["syncs"] = {"step": step, "log_step": log_step, "log_every": every,
                    "per_log_interval": (every - 1) * step["count"] + log_step["count"],
                    "between_log_steps": (every - 1) * step["count"]}
    return out


# ----------------------------------------------------------------------------------------------- compile
def _explain_args(args: ModelArgs) -> ModelArgs:
    per_block = 12 * args.hidden_size ** 2
    if args.depth * per_block <= EXPLAIN_MAX_PARAMS:
        return args
    return dataclasses.replace(args, depth=2, repa_depth=min(args.repa_depth, 2))


def _inputs(args: ModelArgs, batch: int):
    x = torch.randn(batch, args.in_channels, args.input_size, args.input_size)
    t = torch.rand(batch)
    t = (t, t.clone()) if args.dual_time_embed else t
    return x, t, torch.randint(0, args.num_classes, (batch,))


def _cpu_autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def graph_breaks(cfg: Config) -> dict:
    """``torch._dynamo.explain`` of the training forward ``model(xt, t, y)`` (train mode, TP = 1, real CPU
    tensors, micro-batch 2, under CPU autocast when training in bf16)."""
    args = _explain_args(model_args(cfg))
    torch.manual_seed(0)
    model = LightningDiT(args).train()
    torch._dynamo.reset()
    with _cpu_autocast(cfg.train.precision):
        explained = torch._dynamo.explain(model)(*_inputs(args, 2))
    torch._dynamo.reset()
    return {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
            "model_depth": args.depth, "reasons": sorted({str(b.reason) for b in explained.break_reasons})[:10]}


_GEMM_EXTERN = re.compile(r"mm|conv|linear|matmul")
_ATTENTION_EXTERN = re.compile(r"attention|sdpa|flash")


def _count_scheduled(nodes, counts: Counter) -> None:
    """Add one graph's scheduler nodes to ``counts``: extern kernels by kind, the rest as fused kernels."""
    for node in nodes:
        kind = type(node).__name__
        if kind == "NopKernelSchedulerNode" or type(getattr(node, "node", None)).__name__ == "MultiOutput":
            continue  # views, and the unpacking of a multi-output kernel's results: no kernel
        nbytes = node.get_read_write_buffers_sizes()
        if node.is_extern():
            ir = node.node
            name = str(getattr(ir, "op_overload", None) or getattr(ir, "python_kernel_name", "") or ir)
            kind = ("attention" if _ATTENTION_EXTERN.search(name) else
                    "gemm" if _GEMM_EXTERN.search(name) else "extern_other")
            counts[f"{kind}_kernels"] += 1
            counts[f"{kind}_bytes"] += nbytes
        else:
            counts["fused_kernels"] += 1
            counts["fused_bytes"] += nbytes


class _SchedulerCounts:
    """Kernels and bytes of every graph inductor generates code for while active, from its scheduler."""

    def __init__(self):
        self.counts = Counter()

    def __enter__(self):
        from torch._inductor import metrics
        from torch._inductor.graph import GraphLowering

        metrics.reset()
        self._lowering, self._codegen = GraphLowering, GraphLowering.codegen
        counts = self.counts

        def codegen(graph, *a, **kw):
            result = self._codegen(graph, *a, **kw)
            _count_scheduled(graph.scheduler.nodes, counts)
            return result

        GraphLowering.codegen = codegen
        return self

    def __exit__(self, *exc):
        from torch._inductor import metrics

        self._lowering.codegen = self._codegen
        self.counts["cpp_generated_kernels"] = metrics.generated_kernel_count
        return False


def _block_and_inputs(cfg: Config, batch: int):
    args = model_args(cfg)
    rope = Rope2D(args.hidden_size // args.num_heads, args.grid) if args.use_rope else None
    tensor_parallel_size()  # megatron's layers need a (one-process) layout
    torch.manual_seed(0)
    block = LightningDiTBlock(args, parallel_config()).train()
    x = torch.randn(batch, args.grid ** 2, args.hidden_size, requires_grad=True)
    c = torch.randn(batch, args.hidden_size, requires_grad=True)
    return block, (x, c, rope)


# Micro-batches the compiled block is measured at: per-sample bytes are the slope between them. Not 1: at
# micro-batch 1 reductions over the batch are no-ops and inductor fuses differently (45 vs 51 kernels).
BLOCK_MICRO_BATCHES = (2, 4)


def compiled_block(cfg: Config, micro_batches=BLOCK_MICRO_BATCHES) -> dict:
    """Inductor's kernels and bytes for one block's forward + backward at each micro-batch, compiled afresh
    and run with the C++ backend (its own fusion: see ``triton_scheduled_block`` for the CUDA one)."""
    runs = {}
    for b in micro_batches:
        block, inputs = _block_and_inputs(cfg, b)
        compiled = torch.compile(block, dynamic=False)
        torch._dynamo.reset()
        # no cache: a cached graph skips the code generation whose scheduler is read
        with _SchedulerCounts() as sc, torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            with _cpu_autocast(cfg.train.precision):
                out = compiled(*inputs)
            out.float().square().mean().backward()
        runs[b] = dict(sc.counts)
    torch._dynamo.reset()
    return runs


class _Scheduled(Exception):
    """Raised at the entry of kernel code generation, once the scheduler's fused nodes are counted."""


@contextlib.contextmanager
def _as_cuda_nodes():
    """Inductor's scheduler deciding fusion for our CPU nodes as it does for CUDA ones: the fusions it allows on
    GPU nodes only (mix-order reductions: a row reduction and a column reduction of the same tensor in one
    kernel, e.g. a norm's backward with its weight / modulation gradients; loop reordering) are asked of the
    node's device through these three predicates (torch 2.14 ``_inductor/scheduler.py``)."""
    from torch._inductor import scheduler

    with mock.patch.object(scheduler.BaseSchedulerNode, "is_cpu", lambda self: False), \
            mock.patch.object(scheduler.BaseSchedulerNode, "is_gpu", lambda self: True), \
            mock.patch.object(scheduler, "_is_gpu_triton_backend", lambda node1, node2: True):
        yield


def _schedule_only(counts: Counter):
    """A dynamo backend that runs inductor (``compile_fx``) on the captured graph with the Triton backend
    deciding fusion, eagerly for the backward too, stops each graph at kernel code generation (Triton has no
    CPU driver here) after counting its scheduler nodes, and runs the graph eagerly."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    from torch._inductor.scheduler import Scheduler

    reached = []

    def codegen(scheduler):
        _count_scheduled(scheduler.nodes, counts)
        counts["graphs"] += 1
        reached.append(True)
        raise _Scheduled()

    def inner_compile(gm, example_inputs, **kw):
        try:
            with mock.patch.object(Scheduler, "codegen", codegen), _as_cuda_nodes():
                return compile_fx_inner(gm, example_inputs, **kw)
        except Exception:
            if not reached:
                raise  # a failure before the scheduler was built: no counts, say so
            reached.clear()
            return lambda *a: None  # never called: the graph module runs eagerly below

    def backend(gm, example_inputs):
        with torch._inductor.config.patch(cpu_backend="triton"), \
                torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
            compile_fx(gm, example_inputs, inner_compile=inner_compile)
        return gm.forward

    return backend


def triton_scheduled_block(cfg: Config, micro_batches=BLOCK_MICRO_BATCHES) -> dict:
    """Like ``compiled_block``, with inductor's Triton scheduling as for CUDA nodes (one Triton kernel per fused
    node: a row norm is one persistent reduction; the GPU-only fusions of ``_as_cuda_nodes``): forward and
    backward scheduled at trace time, no kernel generated (the forward runs eagerly, the backward not at all).
    Measure at the run's own micro-batch: some fusions depend on the tensor sizes (mix-order reductions need
    4096 rows or more)."""
    runs = {}
    for b in micro_batches:
        block, inputs = _block_and_inputs(cfg, b)
        counts = Counter()
        torch._dynamo.reset()
        with torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            with _cpu_autocast(cfg.train.precision):
                torch.compile(block, backend=_schedule_only(counts), dynamic=False)(*inputs)
        if counts["graphs"] != 2:
            raise RuntimeError(f"expected a forward and a backward graph, scheduled {counts['graphs']}")
        runs[b] = dict(counts)
    torch._dynamo.reset()
    return runs


def compiled_per_block(runs: dict, micro_batch: int) -> dict:
    """Per block at ``micro_batch``: kernels and non-GEMM bytes per sample, as counted at ``micro_batch`` when it
    was, else extrapolated linearly from two micro-batches (per-step traffic, e.g. weight casts, stays once)."""
    def non_gemm_bytes(r):
        return r.get("fused_bytes", 0) + r.get("extern_other_bytes", 0)

    if micro_batch in runs:
        r = runs[micro_batch]
        return {"kernels_per_block": r.get("fused_kernels", 0) + r.get("extern_other_kernels", 0),
                "cpp_kernels_per_block": r.get("cpp_generated_kernels", 0),
                "bytes_per_sample_per_block": non_gemm_bytes(r) / micro_batch}
    lo, hi = sorted(runs)[:2]
    slope = (non_gemm_bytes(runs[hi]) - non_gemm_bytes(runs[lo])) / (hi - lo)
    total = non_gemm_bytes(runs[lo]) + (micro_batch - lo) * slope
    return {"kernels_per_block": runs[hi].get("fused_kernels", 0) + runs[hi].get("extern_other_kernels", 0),
            "cpp_kernels_per_block": runs[hi].get("cpp_generated_kernels", 0),
            "bytes_per_sample_per_block": total / micro_batch}


# ----------------------------------------------------------------------------------------------- predict
def predict(counts: dict, compiled: Optional[dict] = None) -> dict:
    """H100 step time (s) and MFU from the counts (eager) or with the blocks compiled (``compiled_per_block``)."""
    b, depth, blocks = counts["micro_batch"], counts["depth"], counts["blocks"]
    ng = counts["non_gemm"]
    opt = [ng.get(p, {"kernels": 0, "bytes": 0}) for p in ("optimizer", "ema")]
    opt_bytes = sum(p["bytes"] for p in opt)
    act_bytes = counts["non_gemm_total"]["bytes"] - opt_bytes
    kernels = counts["non_gemm_total"]["kernels"]
    if compiled is not None:
        act_bytes += compiled["bytes_per_sample_per_block"] * b * depth - blocks["bytes"]
        kernels += compiled["kernels_per_block"] * depth - blocks["kernels"]
    kernels += counts["gemm_kernels"] + counts["attention_kernels"]
    parts = {"gemm_s": counts["gemm_flops"] / GEMM_FLOPS, "attention_s": counts["attention_flops"] / ATTENTION_FLOPS,
             "non_gemm_s": act_bytes / NON_GEMM_BYTES_PER_S, "optimizer_ema_s": opt_bytes / OPTIMIZER_BYTES_PER_S,
             "launch_s": kernels * LAUNCH_S}
    step = sum(parts.values())
    return {**parts, "kernels": int(kernels), "step_s": step,
            "mfu": counts["model_flops"] / (step * H100_PEAK_FLOPS) if step else math.nan}


# ----------------------------------------------------------------------------------------------- report
def report(cfg: Config, micro_batch: Optional[int] = None, device: str = "meta", compile_block: bool = True) -> dict:
    """Everything the cost model says about one config: counts, graph breaks, compiled block, predictions."""
    counts = count_step(cfg, micro_batch, device)
    out = {"model": cfg.model.name, "micro_batch": counts["micro_batch"], "device": device,
           "constants": CONSTANTS, "counts": counts, "graph_breaks": graph_breaks(cfg),
           "flops_check": (counts["gemm_flops"] + counts["attention_flops"]) / counts["model_flops"],
           "prediction": {"eager": predict(counts)}}
    if compile_block:
        out.update(_compiled(cfg, counts["micro_batch"]))
        out["prediction"]["compiled"] = predict(counts, out["compiled"])
    return out


def _compiled(cfg: Config, micro_batch: int) -> dict:
    """Both compiled-block measurements; ``compiled`` (what the prediction uses): Triton-scheduled, else C++."""
    out = {"compiled_block": compiled_block(cfg)}
    out["compiled_cpp"] = compiled_per_block(out["compiled_block"], micro_batch)
    try:
        out["compiled_block_triton"] = triton_scheduled_block(cfg, (micro_batch,))
    except Exception as e:  # an inductor version whose Triton scheduling cannot run on the CPU: fall back
        out["compiled_triton_error"] = f"{type(e).__name__}: {e}"[:300]
        out["compiled"] = {**out["compiled_cpp"], "scheduling": "cpp"}
        return out
    out["compiled_triton"] = compiled_per_block(out["compiled_block_triton"], micro_batch)
    out["compiled"] = {**out["compiled_triton"], "scheduling": "triton"}
    return out


def _compiled_rows(r: dict) -> Dict[str, str]:
    cpp = r.get("compiled_cpp", r.get("compiled"))  # reports before the Triton scheduling: C++ only
    triton = r.get("compiled_triton")
    used = (r.get("compiled") or {}).get("scheduling", "cpp" if cpp else None)
    return {
        "non-GEMM kernels per block, compiled": f"{cpp['kernels_per_block']}" if cpp else "-",
        "non-GEMM MB per sample per block, compiled": f"{cpp['bytes_per_sample_per_block'] / 1e6:.1f}" if cpp else "-",
        "non-GEMM kernels per block, compiled (Triton scheduling)": f"{triton['kernels_per_block']}" if triton else "-",
        "non-GEMM MB per sample per block, compiled (Triton scheduling)":
            f"{triton['bytes_per_sample_per_block'] / 1e6:.1f}" if triton else "-",
        "compiled prediction uses": {"triton": "Triton scheduling", "cpp": "C++ backend", None: "-"}[used],
    }


def headline(r: dict) -> Dict[str, str]:
    """The figures the issue's acceptance reads, formatted, by row name."""
    c, p, s = r["counts"], r["prediction"], r["counts"]["syncs"]
    opt = sum(c["non_gemm"].get(k, {}).get("bytes", 0) for k in ("optimizer", "ema"))
    rows = {
        "GEMM / attention GFLOP per step": f"{c['gemm_flops'] / 1e9:.1f} / {c['attention_flops'] / 1e9:.1f}",
        "counted / formula model FLOPs": f"{r['flops_check']:.4f}",
        "non-GEMM kernels per block, eager": f"{c['blocks']['kernels_per_block']:.1f}",
        "non-GEMM MB per sample per block, eager": f"{c['blocks']['bytes_per_sample_per_block'] / 1e6:.1f}",
        **_compiled_rows(r),
        "non-GEMM kernels per step (all phases)": f"{c['non_gemm_total']['kernels']}",
        "optimizer + EMA GB per step": f"{opt / 1e9:.1f}",
        "host-device syncs per step / per log interval": f"{s['step']['count']} / {s['per_log_interval']}",
        "host-device syncs between two log steps": f"{s['between_log_steps']}",
        "graph breaks (training forward, TP=1)": f"{r['graph_breaks']['graph_breaks']}",
    }
    for variant in ("eager", "compiled"):
        if variant in p:
            rows[f"predicted H100 ms/step, {variant}"] = f"{p[variant]['step_s'] * 1e3:.1f}"
            rows[f"predicted MFU, {variant}"] = f"{p[variant]['mfu'] * 100:.1f} %"
    return rows


def markdown_tables(runs: Dict[str, dict], baseline: Optional[Dict[str, dict]] = None) -> str:
    """One table per run: its figures, beside the baseline's when the baseline has the same run."""
    lines = []
    for name, r in runs.items():
        before = (baseline or {}).get(name)
        lines += [f"### {name}: {r['model']}, micro-batch {r['micro_batch']}, counted on {r['device']}", ""]
        now = headline(r)
        if before is None:
            lines += ["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in now.items()]
        else:
            old = headline(before)
            lines += ["| figure | before | after |", "|---|---|---|"]
            lines += [f"| {k} | {old.get(k, '-')} | {v} |" for k, v in now.items()]
        if r.get("compiled_triton_error"):
            lines += ["", f"Triton scheduling failed (C++ figures used): {r['compiled_triton_error']}"]
        syncs = r["counts"]["syncs"]
        lines += ["", "Host-device syncs (per step; log step):", ""]
        for which in ("step", "log_step"):
            for s in syncs[which]["where"]:
                lines.append(f"- {which}: {s['count']} x `{s['op']}` at `{s['where']}`")
        if not syncs["step"]["where"] and not syncs["log_step"]["where"]:
            lines.append("- none")
        eager = r["prediction"]["eager"]
        lines += ["", "Eager prediction parts (ms): " + ", ".join(
            f"{k[:-2]} {eager[k] * 1e3:.1f}" for k in ("gemm_s", "attention_s", "non_gemm_s", "optimizer_ema_s",
                                                       "launch_s")),
                  "", "Top non-GEMM ops (kernels per step): " + ", ".join(
                      f"{k} {v}" for k, v in list(r["counts"]["top_ops"].items())[:12]), ""]
    return "\n".join(lines)
