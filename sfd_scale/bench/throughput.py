"""Training throughput: sfd_scale's step (any model, layout, micro-batch, activation checkpointing, compile)
next to an official-style step of the same model, with model FLOPs, MFU, peak memory and the loader's share.

Every setting runs the real ``Trainer.train_step`` on local ranks (``parallel/launch.run_local``; a GPU per
rank when there are GPUs) for ``warmup + steps`` steps and reports the timed steps on rank 0's clock
after a barrier per step (the slowest rank decides). Data: ``synthetic`` reuses one random batch of the
right shapes (the step alone); ``real`` draws every batch from the trainer's loader and reports the share
of the wall time spent waiting for it.

The baseline ("ours / official") is the REAL official training step when ``official_code`` names the
official code's directory (``bench/official_step.py``: its model with its own ``@torch.compile`` wrappers,
its transport, train.py's loop; timed in a fresh process with the setting's thread count, compiled when
the setting compiles ours). Without it, an **official-style eager stand-in** is timed instead and labelled
as such: what train.py does per step written plainly around sfd_scale's network (eager, SDPA, torch AdamW,
per-parameter EMA, bf16 autocast when ``train.precision`` is bf16); it flatters us against the real, compiled
official step. Speed goals live in results files, never in tests.

``checkpoint=True`` also saves the full training state of the benchmarked model twice after the timed
steps (``Trainer.save``: the first save allocates the host staging buffers, the second reuses them) and
reports the time training was blocked by each (``save_blocking_s``) and the background write.

FLOPs per image: ``models/flops.py`` (matmuls, 3x forward for a training step). MFU = model FLOP/s per
device / the device's dense bf16 peak (``device.PEAK_TFLOPS`` by device name, or ``peak_tflops``).
"""
from __future__ import annotations

import itertools
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..config import Config, load_config, model_args, objective_config, sfd_spec
from ..device import peak_tflops as table_peak_tflops
from ..models.flops import training_flops_per_image
from ..parallel.launch import run_local
from ..parallel.optimizations import compile_enabled
from .timing_inputs import sync, synthetic_batch



@dataclass
class Setting:
    name: str
    world_size: int = 1
    overrides: Sequence[str] = field(default_factory=list)


CPU_LAYOUTS = [
    Setting("1 process, plain engine", 1, ["parallel.engine=plain"]),
    Setting("1 process, megatron engine", 1, ["parallel.engine=megatron"]),
    Setting("DP=2 megatron, distributed optimizer", 2, ["parallel.engine=megatron"]),
    Setting("DP=2 deepspeed ZeRO-2", 2, ["parallel.engine=deepspeed", "parallel.zero_stage=2"]),
    Setting("TP=2 megatron", 2, ["parallel.engine=megatron", "parallel.tensor_parallel=2"]),
    Setting("PP=2 megatron, 2 micro-batches", 2, ["parallel.engine=megatron", "parallel.pipeline_parallel=2",
                                                  "train.micro_batch_size=16"]),
]


def sweep(base: Sequence[Setting], axes: Dict[str, Sequence[str]]) -> List[Setting]:
    """Every base setting under every combination of ``axes`` (config key -> values)."""
    out = []
    for setting in base:
        for values in itertools.product(*axes.values()):
            extra = [f"{k}={v}" for k, v in zip(axes, values)]
            name = setting.name + "".join(f", {k.split('.')[-1]}={v}" for k, v in zip(axes, values))
            out.append(Setting(name, setting.world_size, list(setting.overrides) + extra))
    return out


def device_peak_tflops(peak: Optional[float] = None) -> Optional[float]:
    if peak:
        return peak
    if not torch.cuda.is_available():
        return None
    return table_peak_tflops(torch.cuda.get_device_name(), "bf16")


def device_name() -> str:
    import platform

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # the process's peak RSS (Linux: KiB)


def _time_steps(rank: int, world_size: int, config_files: List[str], overrides: List[str], steps: int,
                warmup: int, synthetic: bool, checkpoint: bool = False) -> dict:
    from ..train.trainer import Trainer

    trainer = Trainer(load_config(config_files, overrides))
    device = trainer.device
    per_rank = trainer.cfg.train.global_batch_size // trainer.dp_size
    fixed = synthetic_batch(trainer.cfg, per_rank) if synthetic else None
    batches = None if synthetic else iter(trainer.loader())
    step_times, wait_times = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = fixed if synthetic else next(batches)
        t1 = time.perf_counter()
        trainer.train_step(batch)
        sync(device)
        dist.barrier()
        if i >= warmup:
            step_times.append(time.perf_counter() - t0)
            wait_times.append(t1 - t0)
    saves = _time_saves(trainer) if checkpoint else None
    trainer.data.close()
    return {"step_s": sum(step_times) / steps, "loader_share": sum(wait_times) / sum(step_times),
            "global_batch": trainer.cfg.train.global_batch_size, "peak_memory_gb": _peak_memory_gb(device),
            "device": str(device), "saves": saves}


def _time_saves(trainer) -> List[dict]:
    """Two saves of the full training state: seconds training was blocked (the whole ``Trainer.save`` call,
    and the checkpointer's own part of it), then the background write until published."""
    out = []
    for _ in range(2):
        t0 = time.perf_counter()
        trainer.save()
        sync(trainer.device)
        blocked = time.perf_counter() - t0
        trainer.checkpointer.wait()
        out.append({"blocking_s": blocked, "checkpointer": dict(trainer.checkpointer.last_save),
                    "until_published_s": time.perf_counter() - t0})
    return out


def official_style_step_time(cfg: Config, steps: int, warmup: int) -> float:
    """Seconds per step of the official-style eager STAND-IN (module docstring) at the global batch."""
    from ..diffusion.sfd import SFDObjective
    from ..models.lightningdit import LightningDiT
    from ..parallel.layout import ensure_initialized

    ensure_initialized()
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    model = LightningDiT(model_args(cfg)).to(device).train()
    ema = LightningDiT(model_args(cfg)).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=0)
    objective = SFDObjective(sfd_spec(cfg), objective_config(cfg))
    batch = {k: v.to(device) for k, v in synthetic_batch(cfg, cfg.train.global_batch_size).items()}
    bf16 = cfg.train.precision == "bf16"
    pairs = [(e, p) for e, p in zip(ema.parameters(), model.parameters())]
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = objective.loss_terms(model, batch["latent"], batch["label"],
                                        repa_target=batch.get("repa"))["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # the official update_ema: one parameter at a time
            for e, p in pairs:
                e.mul_(cfg.train.ema_decay).add_(p.data, alpha=1 - cfg.train.ema_decay)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sum(times) / steps


def forward_backward(cfg: Config, micro_batch: int, steps: int, warmup: int, count_flops: bool = False,
                     peak_tflops: Optional[float] = None) -> dict:
    """One process: the model's forward + backward on a synthetic micro-batch (no optimizer, no EMA: what
    fits on a CPU for the 1.0B model). ``count_flops`` also counts them with torch.utils.flop_counter (math
    SDPA, whose matmuls it sees) to check the formula on this very model."""
    from ..diffusion.sfd import SFDObjective
    from ..models.lightningdit import LightningDiT
    from ..parallel.layout import ensure_initialized

    ensure_initialized()
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    model = LightningDiT(model_args(cfg)).to(device).train()
    objective = SFDObjective(sfd_spec(cfg), objective_config(cfg))
    batch = {k: v.to(device) for k, v in synthetic_batch(cfg, micro_batch).items()}
    bf16 = cfg.train.precision == "bf16"

    def run() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = objective.loss_terms(model, batch["latent"], batch["label"], repa_target=batch.get("repa"))["total"]
        loss.backward()
        model.zero_grad(set_to_none=True)

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        run()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    flops = training_flops_per_image(model_args(cfg))
    seconds = sum(times) / steps
    peak = device_peak_tflops(peak_tflops)
    row = {"model": cfg.model.name, "micro_batch": micro_batch, "precision": cfg.train.precision,
           "fwd_bwd_ms": 1000 * seconds, "images_per_s": micro_batch / seconds, "gflop_per_image": flops / 1e9,
           "tflops": micro_batch * flops / seconds / 1e12, "peak_memory_gb": _peak_memory_gb(device),
           "device": device_name()}
    row["mfu"] = row["tflops"] / peak if peak else None
    if count_flops:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            run()
        row["counted_gflop_per_image"] = counter.get_total_flops() / micro_batch / 1e9
        row["formula_vs_counted"] = flops / counter.get_total_flops() * micro_batch
    return row


def compiles(cfg: Config) -> bool:
    """Whether the trainer compiles this config's model (``train.compile``; unset = on when training on CUDA)."""
    device = "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"
    return compile_enabled(cfg.train.compile, torch.device(device))


def _official_seconds(cfg: Config, config_files, all_overrides, steps: int, warmup: int, threads: int,
                      official_code: Optional[str]) -> float:
    """Mean seconds per step of the real official step (fresh process), or of the eager stand-in."""
    if official_code:
        from .official_step import run_isolated

        result = run_isolated("official", list(config_files), all_overrides, steps, warmup, threads, compiles(cfg),
                              official_code)
        return sum(result["step_s"]) / len(result["step_s"])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # as each rank of ours
    try:
        return official_style_step_time(cfg, steps, warmup)
    finally:
        torch.set_num_threads(previous)


def benchmark(settings: Sequence[Setting], config_files: Sequence[str], overrides: Sequence[str], steps: int = 10,
              warmup: int = 3, synthetic: bool = True, official: bool = True, threads_per_rank: int = 1,
              peak_tflops: Optional[float] = None, official_code: Optional[str] = None,
              checkpoint: bool = False) -> List[dict]:
    """One row per setting; the official step (real with ``official_code``, else the eager stand-in) is timed
    once per distinct model / batch / precision / compile."""
    rows, official_cache = [], {}
    peak = device_peak_tflops(peak_tflops)
    for setting in settings:
        all_overrides = list(overrides) + list(setting.overrides)
        cfg = load_config(config_files, all_overrides)
        result = run_local(_time_steps, setting.world_size, threads_per_rank=threads_per_rank,
                           args=(list(config_files), all_overrides, steps, warmup, synthetic, checkpoint))[0]
        flops = training_flops_per_image(model_args(cfg))
        images_per_s = result["global_batch"] / result["step_s"]
        per_device = images_per_s / setting.world_size
        row = {"setting": setting.name, "ranks": setting.world_size, "model": cfg.model.name,
               "global_batch": result["global_batch"], "micro_batch": cfg.train.micro_batch_size,
               "activation_checkpointing": cfg.train.activation_checkpointing, "compile": compiles(cfg),
               "precision": cfg.train.precision, "step_ms": 1000 * result["step_s"], "images_per_s": images_per_s,
               "images_per_s_per_device": per_device, "gflop_per_image": flops / 1e9,
               "tflops_per_device": per_device * flops / 1e12,
               "mfu": per_device * flops / 1e12 / peak if peak else None,
               "peak_memory_gb": result["peak_memory_gb"],
               "loader_share": None if synthetic else result["loader_share"], "device": device_name()}
        if result["saves"]:
            row.update(save_blocking_s=[s["blocking_s"] for s in result["saves"]],
                       save_until_published_s=[s["until_published_s"] for s in result["saves"]],
                       save_checkpointer=[s["checkpointer"] for s in result["saves"]])
        if official:
            key = (str(asdict(cfg.model)), cfg.train.global_batch_size, cfg.train.precision, compiles(cfg),
                   cfg.train.activation_checkpointing, cfg.optim.grad_clip)
            if key not in official_cache:
                official_cache[key] = _official_seconds(cfg, config_files, all_overrides, steps, warmup,
                                                        threads_per_rank, official_code)
            official_images = cfg.train.global_batch_size / official_cache[key]
            row.update(official_images_per_s=official_images, speedup_vs_official=images_per_s / official_images,
                       official_kind=("official code, " + ("compiled" if compiles(cfg) else "eager") if official_code
                                      else "official-style eager stand-in"))
        rows.append(row)
    return rows


def _fmt(value, spec: str, scale: float = 1.0, unit: str = "") -> str:
    return "n/a" if value is None else format(value * scale, spec) + unit


def markdown(rows: List[dict], header: str) -> str:
    kinds = sorted({r["official_kind"] for r in rows if "official_kind" in r})
    official = " / ".join(kinds) if kinds else "official"
    saves = any("save_blocking_s" in r for r in rows)
    lines = [header, "",
             "| setting | ranks | ms / step | images / s | per device | GFLOP / image | TFLOP/s / device | MFU | "
             f"peak mem GB | loader share | {official} images / s | ours / official |"
             + (" save blocking s (1st, 2nd) | save until published s |" if saves else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if saves else "")]
    for r in rows:
        line = (f"| {r['setting']} | {r['ranks']} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | "
                f"{r['images_per_s_per_device']:.1f} | {r['gflop_per_image']:.2f} | {r['tflops_per_device']:.3f} | "
                f"{_fmt(r['mfu'], '.1f', 100, '%')} | {r['peak_memory_gb']:.2f} | "
                f"{_fmt(r['loader_share'], '.1f', 100, '%')} | {_fmt(r.get('official_images_per_s'), '.1f')} | "
                f"{_fmt(r.get('speedup_vs_official'), '.2f')} |")
        if saves:
            blocking, published = r.get("save_blocking_s"), r.get("save_until_published_s")
            line += (f" {', '.join(f'{v:.3f}' for v in blocking)} | {', '.join(f'{v:.2f}' for v in published)} |"
                     if blocking else " n/a | n/a |")
        lines.append(line)
    return "\n".join(lines) + "\n"
