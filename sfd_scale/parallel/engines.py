"""Data-parallel training engines: one small interface, three implementations.

    engine = build_engine(model, cfg)           # picks cfg.parallel.engine: plain | megatron | deepspeed
    metrics = engine.train_step(micro_batches, loss_fn)   # loss_fn(engine.model, micro_batch) -> scalar
    engine.state_dict() / engine.load_state_dict(state)   # optimizer + LR schedule, layout-free (below)

* ``plain`` (this file): one process, torch AdamW (fused where supported), LambdaLR linear warmup,
  ``clip_grad_norm_`` - exactly the single-process trainer's arithmetic.
* ``megatron`` (``engine_megatron.py``): megatron-core DDP (contiguous grad buffers, optional overlapped
  reduce, optional distributed optimizer) + megatron's optimizer, with our fix of its
  DistributedOptimizer reload bug.
* ``deepspeed`` (``engine_deepspeed.py``): ZeRO stage 1 / 2 / 3.

Every engine sees the same split of a global batch: ``micro_batch_layout`` gives (micro batch size,
number of micro-batches per rank) and ``local_micro_batches`` cuts a global batch into this rank's
micro-batches, so a run at DP = 1 and one at DP = 2 process the same samples per optimizer step.
Model *weights* are not part of ``state_dict()``: the trainer saves / loads them through ``module``
(the unwrapped LightningDiT) before calling ``load_state_dict``.

The optimizer state comes in one form for every engine, independent of how it is sharded over
data-parallel ranks: per parameter of ``module`` (per pipeline chunk), Adam's ``exp_avg`` and
``exp_avg_sq`` in the parameter's (TP-local) shape, plus the fp32 ``master`` copy when the weights are
kept in bf16; and layout-free counters (optimizer steps, LR schedule). Engines that shard the optimizer
over DP (megatron's distributed optimizer, ZeRO) assemble each parameter's full state on save and keep
their own fragment on load, so a checkpoint continues on any DP size or engine, and the trainer
reshards it over TP / PP like the weights (``train/checkpoint.py``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, List, Sequence, Tuple

import torch
import torch.distributed as dist

from ..config import Config, ConfigError

ENGINES = ("plain", "megatron", "deepspeed")
LossFn = Callable[[torch.nn.Module, object], torch.Tensor]


# ----------------------------------------------------------------------------------------------- layout
def micro_batch_layout(cfg: Config, dp_size: int) -> Tuple[int, int]:
    """(micro batch size per rank, micro-batches per rank per optimizer step) for ``dp_size`` ranks."""
    gb, mb = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if gb % dp_size:
        raise ConfigError(f"train.global_batch_size ({gb}) is not divisible by the data-parallel size ({dp_size})")
    mb = gb // dp_size if mb is None else mb
    if gb % (mb * dp_size):
        raise ConfigError(f"train.global_batch_size ({gb}) must be a multiple of train.micro_batch_size ({mb}) x "
                          f"data-parallel size ({dp_size}) = {mb * dp_size}")
    return mb, gb // (mb * dp_size)


def local_micro_batches(batch: Sequence[torch.Tensor], micro_batch_size: int, dp_rank: int,
                        dp_size: int) -> List[tuple]:
    """This rank's contiguous share of a global batch (tuple of tensors), cut into micro-batches."""
    n = batch[0].shape[0]
    if n % dp_size:
        raise ValueError(f"global batch of {n} samples does not split over {dp_size} data-parallel ranks")
    per_rank = n // dp_size
    if per_rank % micro_batch_size:
        raise ValueError(f"{per_rank} samples per rank do not split into micro-batches of {micro_batch_size}")
    lo = dp_rank * per_rank
    return [tuple(t[i:i + micro_batch_size] for t in batch) for i in range(lo, lo + per_rank, micro_batch_size)]


def warmup_factor(step: int, warmup: int) -> float:
    """The LR multiplier of optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps."""
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def fused_adamw(cfg: Config, device: torch.device) -> bool:
    return cfg.optim.fused if cfg.optim.fused is not None else device.type in ("cuda", "cpu")


# ----------------------------------------------------------------------------------------------- interface
class Engine:
    """What the trainer talks to. ``model``: call forward on it; ``module``: the unwrapped LightningDiT."""

    name = "engine"
    model: torch.nn.Module
    module: torch.nn.Module
    dp_rank: int = 0
    dp_size: int = 1
    micro_batch_size: int
    num_micro_batches: int

    def train_step(self, micro_batches: Sequence, loss_fn: LossFn) -> dict:
        """Accumulate grads over ``micro_batches`` (each loss scaled by 1/len), reduce over DP, clip
        (optim.grad_clip, 0 = off), optimizer step, LR-schedule step. Returns {'loss': mean loss over
        micro-batches and DP ranks, 'grad_norm': pre-clip global norm or None, 'lr': the LR this step used}."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """{'params': [per chunk: {param name: {kind: tensor}}] (empty before the first step), 'counters':
        {'optimizer_steps': n, engine extras}}. Collective over DP for engines that shard the optimizer."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        """Load ``state_dict()`` output (from any DP size). The weights must already be in ``module``:
        engines with fp32 master copies take them from there when the state has no 'master'."""
        raise NotImplementedError

    def discard_step(self) -> None:
        """Forget a step that raised before its optimizer step (a non-finite loss, ``_mean_loss``): nothing was
        updated, and the next step must start from clean gradients. The plain and megatron engines clear
        gradients at the start of every step already."""

    @contextlib.contextmanager
    def full_parameters(self):
        """``module`` with every parameter materialised in full (ZeRO-3 gathers; others: no-op)."""
        yield self.module

    # ------------------------------------------------------------------------------------------ helpers
    def _check_micro_batches(self, micro_batches: Sequence) -> int:
        n = len(micro_batches)
        if n != self.num_micro_batches:
            raise ValueError(f"{self.name} engine expects {self.num_micro_batches} micro-batches of "
                             f"{self.micro_batch_size} per rank per step (train.global_batch_size / "
                             f"train.micro_batch_size / data-parallel size), got {n}")
        return n

    def _mean_loss(self, losses: List[torch.Tensor], group=None) -> float:
        """Mean over micro-batches and DP ranks; raises on every rank alike when it is not finite."""
        # on the loss's device (NCCL reduces CUDA tensors only), in float64 so the mean is exact enough
        total = torch.stack([l.detach().double() for l in losses]).sum().reshape(1)
        if self.dp_size > 1:
            dist.all_reduce(total, group=group)
        mean = total.item() / (len(losses) * self.dp_size)
        if not math.isfinite(mean):
            raise FloatingPointError(f"non-finite loss {mean} (mean over micro-batches and data-parallel ranks)")
        return mean


# ----------------------------------------------------------------------------------------------- state
ADAM_KINDS = ("exp_avg", "exp_avg_sq")


def state_kinds(cfg: Config) -> Tuple[str, ...]:
    """The per-parameter optimizer tensors a checkpoint holds: with bf16 weights also the fp32 master."""
    return ADAM_KINDS + (("master",) if cfg.train.precision == "bf16" and cfg.parallel.engine != "plain" else ())


def adam_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, step: int) -> dict:
    """``optimizer.state[param]`` of a torch Adam(W), created (zeros, ``step``) the way torch creates it
    before a parameter's first step when it is empty (a fresh optimizer about to be loaded)."""
    state = optimizer.state[param]
    if not state:
        # (ZeRO-3 swaps its flat partitions into the param groups only during its step: default to group 0)
        group = next((g for g in optimizer.param_groups if any(q is param for q in g["params"])),
                     optimizer.param_groups[0])
        on_device = group.get("fused") or group.get("capturable")
        state["step"] = torch.tensor(0.0, dtype=torch.float32, device=param.device if on_device else "cpu")
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    state["step"].fill_(float(step))  # one tensor per parameter: Adam increments it in place
    return state


def set_lr(param_groups: List[dict], lrs: Sequence[float]) -> None:
    for group, lr in zip(param_groups, lrs, strict=True):
        group["lr"] = lr


def lambda_lr_at(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> List[float]:
    """Put a LambdaLR after ``steps`` optimizer steps, through its own state-dict format, and set that LR on
    its optimizer (``load_state_dict`` alone leaves the optimizer's LR as it was). The step count is all a
    checkpoint keeps of the schedule, so it moves between engines."""
    lrs = [base * fn(steps) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    state = scheduler.state_dict()
    state.update(last_epoch=steps, _step_count=steps + 1, _last_lr=lrs)
    scheduler.load_state_dict(state)
    set_lr(scheduler.optimizer.param_groups, lrs)
    return lrs


# ----------------------------------------------------------------------------------------------- plain
class PlainEngine(Engine):
    """One process: the trainer's own optimizer, schedule and clipping, micro-batches accumulated."""

    name = "plain"

    def __init__(self, model: torch.nn.Module, cfg: Config):
        self.model = self.module = model
        self.cfg = cfg
        self.micro_batch_size, self.num_micro_batches = micro_batch_layout(cfg, 1)
        o = cfg.optim
        device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr,
                                           betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                                           fused=fused_adamw(cfg, device))
        warmup = max(o.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: warmup_factor(s, warmup))

    def train_step(self, micro_batches: Sequence, loss_fn: LossFn) -> dict:
        n = self._check_micro_batches(micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for mb in micro_batches:
            loss = loss_fn(self.model, mb)
            (loss if n == 1 else loss / n).backward()
            losses.append(loss.detach())
        mean = self._mean_loss(losses)
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip) if clip > 0 else None
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": mean, "grad_norm": None if grad_norm is None else grad_norm.item(), "lr": lr}

    def state_dict(self) -> dict:
        steps = self.scheduler.last_epoch
        params = {name: {k: self.optimizer.state[p][k].detach().clone() for k in ADAM_KINDS}
                  for name, p in self.module.named_parameters() if p.requires_grad} if steps else {}
        return {"params": [params], "counters": {"optimizer_steps": steps}}

    def load_state_dict(self, state: dict) -> None:
        steps = state["counters"]["optimizer_steps"]
        if steps:
            saved = state["params"][0]
            for name, p in self.module.named_parameters():
                if p.requires_grad:
                    own = adam_state(self.optimizer, p, steps)
                    for k in ADAM_KINDS:
                        own[k].copy_(saved[name][k])
        lambda_lr_at(self.scheduler, steps)


# ----------------------------------------------------------------------------------------------- factory
def build_engine(model: torch.nn.Module, cfg: Config) -> Engine:
    """The engine named by ``cfg.parallel.engine`` around ``model``: built identically (same seed) on every
    rank and already on its device; megatron's parallel state (``layout.initialize``) set up."""
    name = cfg.parallel.engine
    world = dist.get_world_size() if dist.is_initialized() else 1
    if name == "plain":
        if world > 1:
            raise ConfigError(f"parallel.engine='plain' runs in one process, but the world size is {world}: "
                              f"use 'megatron' or 'deepspeed'")
        return PlainEngine(model, cfg)
    if name == "megatron":
        from .engine_megatron import MegatronEngine

        return MegatronEngine(model, cfg)
    if name == "deepspeed":
        from .engine_deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg)
    raise ConfigError(f"parallel.engine must be one of {ENGINES}, got {name!r}")
