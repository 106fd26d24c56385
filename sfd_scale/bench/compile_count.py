"""The compiled side of the cost model (``bench/cost_model.py``): what dynamo and inductor make of the model.

``graph_breaks`` asks ``torch._dynamo.explain`` about the training forward at TP = 1 (on real CPU tensors; a
model over ``EXPLAIN_MAX_PARAMS`` keeps its width, heads and tokens at depth 2). ``compiled_block`` compiles
one real transformer block with inductor (CPU) at micro-batch 2 and 4 and reads the kernels and bytes of the
generated code from inductor's scheduler (the same sum as inductor's ``num_bytes_accessed``, which is only
filled when its metrics log is on), split into GEMM / attention (extern kernels) and the rest. Inductor's C++
backend fuses differently from Triton on CUDA (a row norm is a reduction loop plus a pointwise loop, each
reading the row), so ``triton_scheduled_block`` also lowers the block's forward and backward with the Triton
backend's scheduling, as for CUDA nodes and at the run's micro-batch (at trace time, no kernel generated or
run); the prediction uses its fused nodes (one Triton kernel each on CUDA), the C++ figures kept beside them
(and used when Triton scheduling fails). ``compiled_per_block`` turns either into per-block figures.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from collections import Counter
from unittest import mock

import torch
import torch._functorch.config
import torch._inductor.config

from ..config import Config, model_args
from ..models.embeddings import Rope2D
from ..models.lightningdit import LightningDiT, LightningDiTBlock, ModelArgs, parallel_config
from ..parallel.optimizations import COMPILED_HEADS

EXPLAIN_MAX_PARAMS = 200e6      # bigger models: explain a depth-2 model of the same width


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


def _triton_scheduled(module: torch.nn.Module, inputs: tuple, precision: str) -> dict:
    """Inductor's Triton-scheduled kernels and bytes of ``module(*inputs)``'s forward and backward graphs."""
    counts = Counter()
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        with _cpu_autocast(precision):
            torch.compile(module, backend=_schedule_only(counts), dynamic=False)(*inputs)
    torch._dynamo.reset()
    if counts["graphs"] != 2:
        raise RuntimeError(f"expected a forward and a backward graph, scheduled {counts['graphs']}")
    return dict(counts)


def triton_scheduled_block(cfg: Config, micro_batches=BLOCK_MICRO_BATCHES) -> dict:
    """Like ``compiled_block``, with inductor's Triton scheduling as for CUDA nodes (one Triton kernel per fused
    node: a row norm is one persistent reduction; the GPU-only fusions of ``_as_cuda_nodes``): forward and
    backward scheduled at trace time, no kernel generated (the forward runs eagerly, the backward not at all).
    Measure at the run's own micro-batch: some fusions depend on the tensor sizes (mix-order reductions need
    4096 rows or more)."""
    return {b: _triton_scheduled(*_block_and_inputs(cfg, b), cfg.train.precision) for b in micro_batches}


def triton_scheduled_heads(cfg: Config, micro_batch: int) -> dict:
    """{name: Triton-scheduled counts} of the modules compiled besides the blocks (``COMPILED_HEADS``: the final
    layer, the REPA projector when the model has one), on a depth-1 model of the same width at ``micro_batch``:
    ``final_layer(tokens, c)``, ``repa_projector(tokens)``."""
    args = model_args(cfg)
    args = dataclasses.replace(args, depth=1, repa_depth=min(args.repa_depth, 1))
    torch.manual_seed(0)
    model = LightningDiT(args).train()
    tokens = torch.randn(micro_batch, args.grid ** 2, args.hidden_size, requires_grad=True)
    c = torch.randn(micro_batch, args.hidden_size, requires_grad=True)
    inputs = {"final_layer": (tokens, c), "repa_projector": (tokens,)}
    return {name: _triton_scheduled(getattr(model, name), inputs[name], cfg.train.precision)
            for name in COMPILED_HEADS if getattr(model, name, None) is not None}


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
