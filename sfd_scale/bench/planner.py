"""A layout planner: per-GPU memory of every candidate parallel layout of a model, and which ones fit.

For a config, a GPU count N and a GPU memory size, ``plan`` lists each layout TP x PP x DP = N that the
model's split rules allow (``ModelArgs.check_tensor_parallel`` / ``check_pipeline_split``), on the
megatron engine with the distributed optimizer on and off, and on DeepSpeed ZeRO-1 / 2 / 3 when
TP = PP = 1 (the plain engine for N = 1), with the bytes one GPU holds (the worst pipeline stage):

* weights, grads, optimizer state and EMA from the per-rank parameter counts of the real model built on
  the meta device: a parameter split by a tensor-parallel rule (``models/tensor_parallel.split_of``) counts
  1 / TP, every other is replicated; blocks go to their pipeline stage, the embedders to the first, the
  final layer to the last, the REPA projector to the stage of block ``repa_depth``. What each engine keeps
  per trainable parameter (bytes; d = data-parallel size; sharded = / d):

  ==================  =======  ===============================  =====================================  ======
  engine, precision   weights  grads                            optimizer                              EMA
  ==================  =======  ===============================  =====================================  ======
  plain, any          4        4                                8 (Adam moments)                       4
  megatron, fp32      4        4 (grad buffer)                  8, sharded with distributed_optimizer  4 or s
  megatron, bf16      2        4 (fp32 main-grad buffer)        12 (fp32 master + moments), idem       4 or s
  deepspeed ZeRO-1    4 / 2    4 / 2 (+ 4 sharded in bf16)      8 / 12 sharded                         4 or s
  deepspeed ZeRO-2    4 / 2    4 sharded                        8 / 12 sharded                         4 or s
  deepspeed ZeRO-3    4 / 2 s  4 sharded                        8 / 12 sharded                         s
  ==================  =======  ===============================  =====================================  ======

  (deepspeed: fp32 / bf16; s = sharded). The EMA is an fp32 copy of the whole module on every rank, or, with a
  sharded EMA (``parallel.shard_ema``: by default wherever the optimizer shards its fp32 masters over DP > 1,
  always at ZeRO-3), 4 / d per trainable parameter plus the frozen ones whole (``Layout.sharded_ema``).
  ZeRO-3's weights are its partitions; the layers it gathers for the forward and backward in flight (and
  the small parameters it keeps gathered) are not counted.
* activations MEASURED, not modelled: one training step of the real model (the trainer's objective: SFD
  draws, forward, loss, REPA) runs on the meta device at the micro-batch, under
  ``torch.autograd.graph.saved_tensors_hooks`` that record every tensor autograd keeps for the backward
  (its storage once, parameters excluded), attributed to the block it was saved in or to the rest of the
  network (embedders, REPA, final layer, loss). Under TP a saved tensor whose last dimension is the
  model width (the residual stream, which TP without sequence parallelism replicates) counts whole, every
  other (heads, MLP units, adaLN outputs) 1 / TP. With activation checkpointing a block keeps only its
  input, and one block's activations are recomputed at a time in the backward. With PP the first stage
  holds PP micro-batches in flight (1F1B). Not included: the transient gradients of activations in the
  backward, the allocator's fragmentation and caches, communication buffers, the CUDA context (~0.5 GB);
  ``tests/bench/test_planner.py`` checks the total against the measured peak of CPU runs.
* a predicted H100 step time (``predicted_step_s``) from one cost-model count (``cost_model.count_step``)
  of the whole model at the micro-batch: compute only, no communication.
"""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import weakref
from collections import defaultdict
from typing import Dict, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..config import Config, ema_sharded, model_args
from ..models.summary import build_meta
from ..models.tensor_parallel import split_of
from .cost_model import OPTIMIZER_BYTES_PER_S, build_counting_trainer, count_step, counting_config, predict

GB = 1e9


# ----------------------------------------------------------------------------------------------- parameters
def stage_parameter_counts(cfg: Config, tp: int, pp: int) -> List[Dict[str, int]]:
    """Per pipeline stage: {"all": parameters one TP rank holds, "trainable": those with a gradient}."""
    args = model_args(cfg)
    per_stage = args.depth // pp
    stages = [{"all": 0, "trainable": 0} for _ in range(pp)]
    for name, p in build_meta(args).named_parameters():
        top = name.split(".", 2)
        if top[0] == "blocks":
            stage = int(top[1]) // per_stage
        elif top[0] == "final_layer":
            stage = pp - 1
        elif top[0] == "repa_projector":
            stage = (args.repa_depth - 1) // per_stage
        else:
            stage = 0
        n = p.numel() // tp if split_of(name) is not None else p.numel()
        stages[stage]["all"] += n
        stages[stage]["trainable"] += n if p.requires_grad else 0
    return stages


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    engine: str                 # plain | megatron | deepspeed
    distributed_optimizer: bool = False
    zero_stage: int = 0
    sharded_ema: bool = False   # the EMA sharded over DP with the fp32 masters (``config.ema_sharded``)

    def name(self) -> str:
        if self.engine == "megatron":
            return f"megatron{' dist-opt' if self.distributed_optimizer else ''}"
        return f"deepspeed ZeRO-{self.zero_stage}" if self.engine == "deepspeed" else self.engine


def state_bytes(layout: Layout, params: Dict[str, int], bf16: bool) -> Dict[str, float]:
    """Weights, grads, optimizer and EMA bytes of one rank holding ``params`` (the table in the docstring)."""
    n, t, d = params["all"], params["trainable"], layout.dp
    master = 4 if bf16 else 0  # fp32 master weights, kept by the optimizer when the module is bf16
    ema = 4 * t / d + 4 * (n - t) if layout.sharded_ema else 4 * n
    if layout.engine == "plain":
        return {"weights": 4 * n, "grads": 4 * t, "optimizer": 8 * t, "ema": ema}
    if layout.engine == "megatron":
        shard = d if layout.distributed_optimizer else 1
        return {"weights": (2 if bf16 else 4) * n, "grads": 4 * t, "optimizer": (8 + master) * t / shard,
                "ema": ema}
    # ZeRO-1 keeps the module's whole gradients (and, in bf16, an fp32 copy of its partition); ZeRO-2 and 3
    # reduce-scatter them in the backward and keep only their fp32 partition (the reduce bucket not counted);
    # ZeRO-3 partitions the weights too
    whole = (2 if bf16 else 4) * t if layout.zero_stage == 1 else 0
    partition = 4 * t / d if bf16 or layout.zero_stage >= 2 else 0
    grads = whole + partition
    weights = (2 if bf16 else 4) * n / (d if layout.zero_stage == 3 else 1)
    return {"weights": weights, "grads": grads, "optimizer": (8 + master) * t / d, "ema": ema}


# ----------------------------------------------------------------------------------------------- activations
class SavedTensorBytes:
    """Bytes autograd keeps for the backward, by where they were saved: ``blocks`` (per block index, split
    into ``replicated`` = last dimension is the model width, and ``split`` = the rest), ``outside``
    (before, between and after the blocks), and each block's ``input`` bytes. A storage counts once (the
    first saver), parameters never."""

    def __init__(self, model: torch.nn.Module, hidden_size: int):
        self.hidden = hidden_size
        self.seen = {p.untyped_storage()._cdata for p in model.parameters()}
        self.where: Optional[int] = None
        self.blocks = defaultdict(lambda: {"replicated": 0, "split": 0, "input": 0})
        self.outside = 0
        self._handles = []
        for i, block in zip(model.block_ids, model.blocks):
            self._handles += [block.register_forward_pre_hook(self._enter(i)),
                              block.register_forward_hook(lambda *a: setattr(self, "where", None))]

    def _enter(self, index: int):
        def hook(module, inputs):
            self.where = index
            if torch.is_grad_enabled():
                x = inputs[0]  # the block's own input (the conditioning is shared by all blocks)
                self.blocks[index]["input"] += x.untyped_storage().nbytes()
        return hook

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        if storage._cdata not in self.seen:
            self.seen.add(storage._cdata)
            if self.where is None:
                self.outside += storage.nbytes()
            else:
                kind = "replicated" if t.dim() and t.shape[-1] == self.hidden else "split"
                self.blocks[self.where][kind] += storage.nbytes()
        return t

    @contextlib.contextmanager
    def recording(self):
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for h in self._handles:
                h.remove()


def one_process(cfg: Config) -> Config:
    """``cfg`` on the plain engine, TP = PP = 1, no activation checkpointing: what is measured and counted."""
    r = dataclasses.replace
    return r(cfg, parallel=r(cfg.parallel, engine="plain", tensor_parallel=1, pipeline_parallel=1, virtual_stages=1),
             train=r(cfg.train, activation_checkpointing=False))


def measure_activations(cfg: Config, micro_batch: int, device: str = "meta") -> dict:
    """Saved-for-backward bytes of one training step of ``one_process(cfg)`` at ``micro_batch`` on
    ``device``: ``outside``, and per block (the largest block) ``replicated``, ``split`` and ``input``."""
    cfg = one_process(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = counting_config(cfg, micro_batch, tmp)
        trainer = build_counting_trainer(cfg, torch.device(device))
        batch = next(iter(trainer.loader()))
        with SavedTensorBytes(trainer.model, model_args(cfg).hidden_size).recording() as saved:
            trainer.train_step(batch)
    block = max(saved.blocks.values(), key=lambda b: b["replicated"] + b["split"])
    return {"micro_batch": micro_batch, "outside": saved.outside, "depth": len(saved.blocks), **block}


def stage_activation_bytes(acts: dict, tp: int, pp: int, stage: int, checkpointing: bool,
                           micro_batches: int) -> float:
    """Activation bytes on pipeline stage ``stage`` of ``pp``: its depth / PP blocks for each micro-batch in
    flight there (1F1B: PP - stage, at most the micro-batches of the step)."""
    block = acts["replicated"] + acts["split"] / tp
    kept = acts["depth"] // pp * (acts["input"] if checkpointing else block)
    in_flight = min(pp - stage, micro_batches)
    recompute = block if checkpointing else 0  # one block's activations rebuilt at a time in the backward
    # the rest of the network (embedders, REPA, final layer and loss: replicated under TP) counted on every
    # stage, for every micro-batch in flight (conservative: it lives on the first and last stages)
    return in_flight * (kept + acts["outside"]) + recompute


# ----------------------------------------------------------------------------------------------- layouts
def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: Config, gpus: int) -> List[Layout]:
    """Every TP x PP x DP = ``gpus`` the model's split rules allow, with each engine that can run it."""
    args = model_args(cfg)
    out = []
    for tp in _divisors(gpus):
        try:
            args.check_tensor_parallel(tp)
        except ValueError:
            continue
        for pp in _divisors(gpus // tp):
            try:
                args.check_pipeline_split(pp)
            except ValueError:
                continue
            dp = gpus // (tp * pp)
            if gpus == 1:
                out.append(Layout(1, 1, 1, "plain"))
            out.append(_with_ema(cfg, Layout(tp, pp, dp, "megatron", distributed_optimizer=False)))
            if dp > 1:  # with one data-parallel rank there is nothing to shard over
                out.append(_with_ema(cfg, Layout(tp, pp, dp, "megatron", distributed_optimizer=True)))
            if tp == pp == 1:
                out += [_with_ema(cfg, Layout(1, 1, dp, "deepspeed", zero_stage=stage)) for stage in (1, 2, 3)]
    return out


def _with_ema(cfg: Config, layout: Layout) -> Layout:
    """``layout`` with its EMA as ``cfg``'s ``parallel.shard_ema`` makes it there (``config.ema_sharded``)."""
    p = dataclasses.replace(cfg.parallel, engine=layout.engine, distributed_optimizer=layout.distributed_optimizer,
                            zero_stage=layout.zero_stage or cfg.parallel.zero_stage)
    return dataclasses.replace(layout, sharded_ema=ema_sharded(p, layout.dp))


def layout_memory(cfg: Config, layout: Layout, acts: dict, micro_batch: int) -> Dict[str, float]:
    """Per-GPU bytes of ``layout`` (the worst pipeline stage): weights, grads, optimizer, EMA, activations."""
    bf16 = cfg.train.precision == "bf16" and layout.engine != "plain"
    stages = stage_parameter_counts(cfg, layout.tp, layout.pp)
    micro_batches = max(1, cfg.train.global_batch_size // (layout.dp * micro_batch))
    rows = []
    for s, params in enumerate(stages):
        row = state_bytes(layout, params, bf16)
        row["activations"] = stage_activation_bytes(acts, layout.tp, layout.pp, s,
                                                    cfg.train.activation_checkpointing, micro_batches)
        row["total"] = sum(row.values())
        rows.append(row)
    return max(rows, key=lambda r: r["total"])


def predicted_step_s(counts: dict, layout: Layout, micro_batches: int, checkpointing: bool) -> float:
    """H100 seconds of one optimizer step on one GPU of ``layout``, compute only, from the cost model's
    counts of one micro-batch of the whole model (``cost_model.count_step``, TP = PP = 1): GEMMs and
    attention split over TP; the non-GEMM work and kernel launches NOT split (most of it is on the
    residual stream, which TP replicates); the blocks split over PP stages with the 1F1B bubble
    (micro-batches + PP - 1 slots); activation checkpointing adds one block forward (1/3 of forward +
    backward GEMMs and attention); the optimizer step split over TP x PP (and DP where it is sharded), the
    EMA likewise. Not modelled: any communication (TP all-reduces, DP reduce, pipeline sends, ZeRO-3's
    gathers of the weights)."""
    p = predict(counts)
    ng = counts["non_gemm"]
    opt_s, ema_s = (ng.get(k, {}).get("bytes", 0) / OPTIMIZER_BYTES_PER_S for k in ("optimizer", "ema"))
    matmul_s = (p["gemm_s"] + p["attention_s"]) * (4 / 3 if checkpointing else 1) / layout.tp
    micro_s = matmul_s + p["non_gemm_s"] + p["launch_s"]
    pipeline_s = micro_s / layout.pp * (micro_batches + layout.pp - 1)
    sharded = layout.distributed_optimizer or layout.engine == "deepspeed"
    return pipeline_s + opt_s / (layout.tp * layout.pp * (layout.dp if sharded else 1)) + ema_s / (
        layout.tp * layout.pp * (layout.dp if layout.sharded_ema else 1))


def plan(cfg: Config, gpus: int, gpu_mem_gb: float, micro_batch: Optional[int] = None,
         device: str = "meta", step_time: bool = True) -> dict:
    """Every candidate layout of ``cfg`` on ``gpus`` GPUs of ``gpu_mem_gb`` GB, with its per-GPU memory and
    (``step_time``) its predicted H100 step time (``predicted_step_s``; one cost-model count on meta)."""
    micro_batch = micro_batch or cfg.train.micro_batch_size or 1
    acts = measure_activations(cfg, micro_batch, device)
    counts = count_step(one_process(cfg), micro_batch, "meta") if step_time else None
    rows = []
    for layout in candidate_layouts(cfg, gpus):
        mem = layout_memory(cfg, layout, acts, micro_batch)
        rows.append({"layout": layout, **mem, "fits": mem["total"] <= gpu_mem_gb * GB})
        if counts is not None:
            micro_batches = max(1, cfg.train.global_batch_size // (layout.dp * micro_batch))
            rows[-1]["step_s"] = predicted_step_s(counts, layout, micro_batches, cfg.train.activation_checkpointing)
    return {"model": cfg.model.name, "gpus": gpus, "gpu_mem_gb": gpu_mem_gb, "micro_batch": micro_batch,
            "precision": cfg.train.precision, "global_batch": cfg.train.global_batch_size,
            "activation_checkpointing": cfg.train.activation_checkpointing,
            "activations_measured": acts, "rows": rows}


def markdown_table(result: dict) -> str:
    """The plan as a markdown table (GB per GPU, 1 GB = 1e9 bytes)."""
    r = result
    lines = [f"{r['model']}, {r['gpus']} GPUs of {r['gpu_mem_gb']:g} GB, micro-batch {r['micro_batch']}, "
             f"{r['precision']}, activation checkpointing {'on' if r['activation_checkpointing'] else 'off'}, "
             f"global batch {r['global_batch']}",
             "",
             "| TP | PP | DP | engine | weights | grads | optimizer | EMA | activations | total GB | fits | "
             "H100 s/step |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lay = row["layout"]
        figures = " | ".join(f"{row[k] / GB:.1f}" for k in ("weights", "grads", "optimizer", "ema", "activations",
                                                           "total"))
        step = f"{row['step_s']:.2f}" if "step_s" in row else "-"
        lines.append(f"| {lay.tp} | {lay.pp} | {lay.dp} | {lay.name()} | {figures} | "
                     f"{'yes' if row['fits'] else 'no'} | {step} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- validation
class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the ``device`` tensor storages alive, and their peak, while active: what the validation
    measures on CPU. Every storage an aten op outputs (forward, backward, optimizer, EMA, data) is counted
    from its creation until Python and autograd have both let it go (a weak reference to the storage;
    views add nothing); ``track`` adds storages made before (parameters, EMA). No allocator: no caching,
    rounding or fragmentation, which the planner does not model either."""

    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.device, self.live, self.now, self.peak = torch.device(device), {}, 0, 0

    def track(self, tensors) -> None:
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor) and t.device == self.device:
                storage = t.untyped_storage()
                if storage._cdata not in self.live:
                    self.live[storage._cdata] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._free, storage._cdata)
        self.peak = max(self.peak, self.now)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out
