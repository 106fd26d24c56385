"""A cost model of one training step that runs without a GPU: count it, then predict an H100's step time.

``count_step`` builds the real ``Trainer`` (synthetic data, one micro-batch per step, eager) on real CPU
tensors or on the meta device (big models: never materialised) and runs ``Trainer.train_step`` (draws,
objective forward + backward, engine optimizer step, EMA update) under ``dispatch_count.OpCounter``:
GEMM / attention FLOPs, non-GEMM kernels and bytes (total, per phase, per block), host-device syncs
with their callers. The first step warms up (optimizer state); the second is counted; the third is a
log step (its metrics are read on the host, as the run logger does) and gives the syncs of a log step.
The forward runs under ``CudaAutocast`` (CUDA autocast semantics on any device) and on meta the
optimizer runs as it would on CUDA (fused AdamW when ``optim.fused`` allows it).

The compiled side (graph breaks, the block as inductor compiles it, C++ and Triton scheduling) is
``bench/compile_count.py``.

``predict`` turns counts into an H100 step time and MFU with the fixed constants below, eager and with
the blocks compiled (block non-GEMM figures replaced by ``compiled_block``'s, the rest eager).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
from unittest import mock
from collections import Counter
from typing import Dict, Optional

import torch

from ..config import Config, model_args
from ..models.flops import training_flops_per_image
from ..parallel.engines.base import adam_state, fused_adamw
from .compile_count import (EXPLAIN_MAX_PARAMS, compiled_block, compiled_per_block,  # noqa: F401 (re-exported)
                            graph_breaks, triton_scheduled_block, triton_scheduled_heads)
from .dispatch_count import CudaAutocast, OpCounter, OrderedModuleTracker
from ..train.step_io import StepWindow
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

# ----------------------------------------------------------------------------------------------- constants
# H100 SXM figures for the prediction. FIXED: change them only from a real GPU measurement (and say which
# in benchmarks/cost_model.md), never to make a prediction fit.
H100_PEAK_FLOPS = 989e12        # dense bf16 tensor-core peak: the MFU denominator
GEMM_FLOPS = 692e12             # 70 % of the peak, sustained by large bf16 GEMMs
ATTENTION_FLOPS = 495e12        # flash attention forward + backward (50 % of the peak)
NON_GEMM_BYTES_PER_S = 2.6e12   # elementwise / reduction kernels: ~80 % of 3.35 TB/s HBM3
OPTIMIZER_BYTES_PER_S = 2.6e12  # optimizer step and EMA update (multi-tensor kernels), same bandwidth
LAUNCH_S = 4e-6                 # per kernel (launch + tail), added to every kernel counted

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
    from ..train.trainer import Trainer

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
    blocks, block_ids, heads = Counter(), set(), {}
    for (phase, scope), c in counter.totals.items():
        phases.setdefault(phase, Counter()).update(c)
        if isinstance(scope, int):
            blocks.update(c)
            block_ids.add(scope)
        elif scope is not None:
            heads.setdefault(scope, Counter()).update(c)
    total = sum(phases.values(), Counter())
    out = {k: int(total[k]) for k in ("gemm_flops", "attention_flops", "gemm_kernels", "attention_kernels")}
    out["non_gemm"] = {p: {"kernels": int(c["kernels"]), "bytes": int(c["bytes"])} for p, c in sorted(phases.items())}
    out["non_gemm_total"] = {"kernels": int(total["kernels"]), "bytes": int(total["bytes"])}
    out["blocks"] = {"count": len(block_ids), "kernels": int(blocks["kernels"]), "bytes": int(blocks["bytes"]),
                     "gemm_flops": int(blocks["gemm_flops"]), "attention_flops": int(blocks["attention_flops"]),
                     "kernels_per_block": blocks["kernels"] / depth,
                     "bytes_per_sample_per_block": blocks["bytes"] / micro_batch / depth}
    # the other modules compiled on CUDA (final layer, REPA projector), eager, per step
    out["heads"] = {name: {"kernels": int(c["kernels"]), "bytes": int(c["bytes"])} for name, c in sorted(heads.items())}
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
        tracker = OrderedModuleTracker()
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


# ----------------------------------------------------------------------------------------------- predict
def predict(counts: dict, compiled: Optional[dict] = None) -> dict:
    """H100 step time (s) and MFU from the counts (eager) or with the blocks compiled (``compiled_per_block``; with
    its ``heads``, the final layer and REPA projector compiled too, as on CUDA)."""
    b, depth, blocks = counts["micro_batch"], counts["depth"], counts["blocks"]
    ng = counts["non_gemm"]
    opt = [ng.get(p, {"kernels": 0, "bytes": 0}) for p in ("optimizer", "ema")]
    opt_bytes = sum(p["bytes"] for p in opt)
    act_bytes = counts["non_gemm_total"]["bytes"] - opt_bytes
    kernels = counts["non_gemm_total"]["kernels"]
    if compiled is not None:
        act_bytes += compiled["bytes_per_sample_per_block"] * b * depth - blocks["bytes"]
        kernels += compiled["kernels_per_block"] * depth - blocks["kernels"]
        for name, head in compiled.get("heads", {}).items():  # final layer, REPA projector: where counted both ways
            eager = counts.get("heads", {}).get(name)
            if eager is not None:
                act_bytes += head["bytes"] - eager["bytes"]
                kernels += head["kernels"] - eager["kernels"]
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
    out["compiled_heads_triton"] = triton_scheduled_heads(cfg, micro_batch)
    heads = {name: {"kernels": r.get("fused_kernels", 0) + r.get("extern_other_kernels", 0),
                    "bytes": r.get("fused_bytes", 0) + r.get("extern_other_bytes", 0)}
             for name, r in out["compiled_heads_triton"].items()}
    out["compiled"] = {**out["compiled_triton"], "heads": heads, "scheduling": "triton"}
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
        "final layer + REPA projector: non-GEMM kernels / MB per step, eager -> compiled (Triton scheduling)":
            _heads_row(r),
        "compiled prediction uses": {"triton": "Triton scheduling", "cpp": "C++ backend", None: "-"}[used],
    }


def _heads_row(r: dict) -> str:
    """The compiled modules besides the blocks, eager (counted) and compiled (scheduled), summed."""
    eager, compiled = r.get("counts", {}).get("heads"), (r.get("compiled") or {}).get("heads")
    if not eager or not compiled:
        return "-"

    def total(heads, key):
        return sum(h[key] for h in heads.values())
    return (f"{total(eager, 'kernels')} / {total(eager, 'bytes') / 1e6:.0f} -> "
            f"{total(compiled, 'kernels')} / {total(compiled, 'bytes') / 1e6:.0f}")


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
