"""What every training engine shares: the ``Engine`` interface, the batch layout, the non-finite skip, the
layout-free optimizer state. This module imports none of the engines (``plain.py``, ``megatron.py``,
``deepspeed.py`` build on it; the factory ``build_engine`` is in the package's ``__init__``).

    engine = build_engine(model, cfg)                     # picks cfg.parallel.engine: plain | megatron | deepspeed
    metrics = engine.train_step(micro_batches, objective)  # objective(engine.model, micro_batch) -> loss terms
    engine.state_dict() / engine.load_state_dict(state)    # optimizer + LR schedule, layout-free (below)

Every engine sees the same split of a global batch: ``micro_batch_layout`` gives (micro batch size,
number of micro-batches per rank) and ``local_micro_batches`` cuts a global batch into this rank's
micro-batches, so a run at DP = 1 and one at DP = 2 process the same samples per optimizer step.
No host sync inside a step: ``train_step`` returns device tensors (loss, grad norm, a ``nonfinite`` flag) and a
step whose loss (or grad norm, with clipping) is not finite skips its update on the device, as AMP's
``found_inf`` does (``skip_unless_finite``): torch's fused AdamW takes the flag (``optimizer.found_inf``), leaves
parameters, moments and its step count as they were, and every engine uses it where the device allows. The LR schedule
and the engines' step counters advance on every step, skipped or not (as under AMP); each engine counts its
skipped steps on the device (``nonfinite_steps``), and Adam's step count = optimizer steps - skipped steps,
which is what a checkpoint restores.

Model *weights* are not part of ``state_dict()``: the trainer saves / loads them through ``module``
(the unwrapped LightningDiT) before calling ``load_state_dict``.

The optimizer state comes in one form for every engine, independent of how it is sharded over
data-parallel ranks: per parameter of ``module`` (per pipeline chunk), Adam's ``exp_avg`` and
``exp_avg_sq`` in the parameter's (TP-local) shape, plus the fp32 ``master`` copy when the weights are
kept in bf16; and layout-free counters (optimizer steps, LR schedule). Engines that shard the optimizer
over DP (megatron's distributed optimizer, ZeRO) assemble each parameter's full state on save and keep
their own fragment on load, so a checkpoint continues on any DP size or engine, and the trainer
reshards it over TP / PP like the weights (``train/state.py``).

The EMA's sources: one whole tensor per trainable parameter (``ema_sources``), or, with a sharded EMA
(``parallel.shard_ema``, ``config.ema_sharded``; always at ZeRO-3), the pieces of the fp32 master weights this
rank's optimizer holds (``master_pieces``): every element of every trainable parameter lies in exactly one
data-parallel rank's pieces, so the EMA of those pieces is the EMA of the whole model, split over DP.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
import torch.distributed as dist

from ...config import Config, ConfigError, ema_sharded
from ...diffusion.micro_batch import MicroBatch
from ...diffusion.sfd import LOGGED_TERMS


class Objective(Protocol):
    """What every engine trains: ``objective(model, micro_batch)`` -> the micro-batch's loss terms, ``'total'``
    the scalar to back-propagate (``diffusion.sfd.SFDObjective``). Pipelined, megatron's schedules split it
    over the stages through its ``prepare`` / ``losses`` / ``repa_term`` (``pipeline.forward_backward``) and
    names the logged terms every stage reduces by ``logged_names``. Terms named in ``LOGGED_TERMS`` (0-dim
    batch means) are logged where the objective gives them."""

    def __call__(self, model: torch.nn.Module, batch: MicroBatch) -> Dict[str, torch.Tensor]: ...


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


def local_micro_batches(batch: MicroBatch, micro_batch_size: int, dp_rank: int, dp_size: int) -> List[MicroBatch]:
    """This rank's contiguous share of a global batch, cut into micro-batches (views)."""
    n = batch.size
    if n % dp_size:
        raise ValueError(f"global batch of {n} samples does not split over {dp_size} data-parallel ranks")
    per_rank = n // dp_size
    if per_rank % micro_batch_size:
        raise ValueError(f"{per_rank} samples per rank do not split into micro-batches of {micro_batch_size}")
    lo = dp_rank * per_rank
    return [batch.rows(i, i + micro_batch_size) for i in range(lo, lo + per_rank, micro_batch_size)]


def warmup_factor(step: int, warmup: int) -> float:
    """The LR multiplier of optimizer step ``step`` (0-based): linear warmup over ``warmup`` steps."""
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def fused_adamw(cfg: Config, device: torch.device) -> bool:
    return cfg.optim.fused if cfg.optim.fused is not None else device.type in ("cuda", "cpu")


# ----------------------------------------------------------------------------------------------- skip
def nonfinite_flag(loss: torch.Tensor, grad_norm: Optional[torch.Tensor]) -> torch.Tensor:
    """0-dim float32 on the device: 1 when the step's loss, or its global grad norm where one is computed
    (with clipping), is NaN / Inf. Without clipping no norm is computed for this alone: it would read every
    gradient once more per step (4 GB on SFD-XXL); a non-finite gradient under a finite loss then goes to
    Adam as in the official code."""
    bad = ~torch.isfinite(loss) if grad_norm is None else ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)
    return bad.to(device=loss.device, dtype=torch.float32)


def is_fused_adam(optimizer) -> bool:
    """torch Adam / AdamW running its fused kernel: the one that honours ``found_inf``."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        g.get("fused") for g in optimizer.param_groups)


def skip_unless_finite(optimizers: Sequence, nonfinite: torch.Tensor, step: Callable[[], object]) -> None:
    """Run ``step`` (the optimizer step over ``optimizers``, the torch optimizers doing the arithmetic) so that
    nothing changes when ``nonfinite`` is 1. Fused torch Adam(W): the flag goes in as ``found_inf`` (the kernel
    returns early and takes back its step increment): no sync. Any other optimizer (foreach torch Adam, TE /
    apex FusedAdam: none takes a device flag) reads the flag on the host first: one sync per step, named in
    ``optimizer_impl``. On the meta device (counting runs) there is no value to read: the step runs."""
    if optimizers and all(is_fused_adam(o) for o in optimizers):
        for o in optimizers:
            o.grad_scale, o.found_inf = None, nonfinite
        step()
        return
    if nonfinite.device.type == "meta" or not bool(nonfinite):
        step()


def optimizer_name(optimizer) -> str:
    """What runs the update: 'torch fused AdamW', 'torch foreach AdamW', 'TransformerEngine FusedAdam', ..."""
    module = type(optimizer).__module__
    if module.startswith("transformer_engine"):
        return f"TransformerEngine {type(optimizer).__name__}"
    if module.startswith("apex"):
        return f"apex {type(optimizer).__name__}"
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        group = optimizer.param_groups[0] if optimizer.param_groups else {"params": []}
        foreach = group.get("foreach")  # None: torch's default, foreach when every parameter is on CUDA
        if foreach is None:
            foreach = bool(group["params"]) and all(p.device.type == "cuda" for p in group["params"])
        kind = "fused" if group.get("fused") else "foreach" if foreach else "single-tensor"
        return f"torch {kind} {type(optimizer).__name__}"
    return f"{module}.{type(optimizer).__name__}"


def describe_optimizers(optimizers: Sequence) -> str:
    names = sorted({optimizer_name(o) for o in optimizers})
    text = " + ".join(names) if names else "none"
    if not all(is_fused_adam(o) for o in optimizers):
        text += " (the non-finite check reads a flag on the host every step)"
    return text


# ----------------------------------------------------------------------------------------------- EMA sources
@dataclass(frozen=True)
class MasterPiece:
    """Flat elements [start, start + tensor.numel()) of trainable parameter ``index`` (its place among the
    trainable parameters of ``Engine.module``, pipeline chunks in order; TP-local shape), whose fp32 master
    this rank's optimizer holds in ``tensor`` (a live flat view: the optimizer updates it in place)."""
    index: int
    start: int
    tensor: torch.Tensor


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
    cfg: Config
    notes: List[str]  # warnings for the run log (e.g. an optimizer fallback)
    _nonfinite_total: Optional[torch.Tensor] = None

    def train_step(self, micro_batches: Sequence[MicroBatch], objective: Objective) -> dict:
        """Accumulate grads of ``objective``'s total over ``micro_batches`` (each scaled by 1/len; the forward
        under ``forward_precision``), reduce over DP, clip
        (optim.grad_clip, 0 = off), optimizer step, LR-schedule step. Returns device tensors and no host
        sync: {'loss': 0-dim mean loss over micro-batches and DP ranks, 'grad_norm': pre-clip global norm
        (0-dim) or None without clipping, 'lr': the LR this step used (float), 'nonfinite': 0-dim float, 1
        when the loss or the gradients were not finite and the update was skipped, 'terms': {name: 0-dim mean
        over micro-batches and DP ranks, like 'loss'} of the loss terms the objective logs
        (``diffusion.sfd.SFDObjective.term_means``; empty for an objective that gives none)}."""
        raise NotImplementedError

    @property
    def optimizer_impl(self) -> str:
        """The optimizer implementation actually running the update (``describe_optimizers``)."""
        return describe_optimizers(self.torch_optimizers())

    def torch_optimizers(self) -> list:
        """The optimizer objects doing the arithmetic (inside megatron / DeepSpeed wrappers)."""
        raise NotImplementedError

    @property
    def shard_ema(self) -> bool:
        """Whether the trainer keeps a sharded EMA (``master_pieces``) rather than a whole one."""
        return ema_sharded(self.cfg.parallel, self.dp_size)

    def ema_sources(self) -> List[torch.Tensor]:
        """What the EMA follows. Whole EMA: one tensor per trainable parameter of ``module`` (pipeline chunks in
        order), the fp32 master copy where this rank holds it whole, else the parameter itself. Sharded EMA
        (``shard_ema``): the tensors of ``master_pieces()``, in order."""
        if self.shard_ema:
            return [piece.tensor for piece in self.master_pieces()]
        return [p for chunk in self._chunks() for p in chunk.parameters() if p.requires_grad]

    def master_pieces(self) -> List[MasterPiece]:
        """This rank's pieces of the fp32 master weights (module docstring), for engines that shard them."""
        raise NotImplementedError(f"the {self.name} engine does not shard its fp32 master weights")

    @property
    def master_group(self):
        """The process group over which ``master_pieces`` cover every parameter once (data-parallel)."""
        return None

    def grad_reduce_dtype(self) -> str:
        """The dtype gradients are reduced over data-parallel ranks in (start-up log)."""
        return "none (one process)"

    def state_dict(self) -> dict:
        """{'params': [per chunk: {param name: {kind: tensor}}] (empty while Adam has no step), 'counters':
        {'optimizer_steps': n, 'nonfinite_steps': skipped, engine extras}}. Collective over DP for engines
        that shard the optimizer."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        """Load ``state_dict()`` output (from any DP size). The weights must already be in ``module``:
        engines with fp32 master copies take them from there when the state has no 'master'."""
        raise NotImplementedError

    @contextlib.contextmanager
    def full_parameters(self, modify: bool = False):
        """``module`` with every parameter materialised in full (ZeRO-3 gathers; others: no-op). ``modify``: the
        caller writes the weights (every rank the same values) and they are partitioned again on exit."""
        yield self.module

    @property
    def partitions_weights(self) -> bool:
        """True where ``module``'s parameters hold only a partition outside ``full_parameters`` (ZeRO-3)."""
        return False

    def forward_precision(self):
        """The context the objective's forward and loss run in: bf16 autocast under ``train.precision='bf16'``
        (megatron / DeepSpeed keep bf16 weights besides; the plain engine fp32 ones), else nothing. The cost
        model puts its CUDA-autocast stand-in here (``bench/cost_model.py``)."""
        if self.cfg.train.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(next(self._chunks()[0].parameters()).device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------------------------------ helpers
    def _loss(self, objective: Objective, batch: MicroBatch) -> Dict[str, torch.Tensor]:
        """One micro-batch through ``model``: {'total': the loss to back-propagate (not yet), and the logged
        term means the objective gave (``LOGGED_TERMS``, detached)}."""
        with self.forward_precision():
            terms = objective(self.model, batch)
        return {"total": terms["total"]} | {k: terms[k].detach() for k in LOGGED_TERMS if k in terms}

    def _chunks(self) -> list:
        return list(self.module) if isinstance(self.module, (list, tuple)) else [self.module]

    def _check_micro_batches(self, micro_batches: Sequence) -> int:
        n = len(micro_batches)
        if n != self.num_micro_batches:
            raise ValueError(f"{self.name} engine expects {self.num_micro_batches} micro-batches of "
                             f"{self.micro_batch_size} per rank per step (train.global_batch_size / "
                             f"train.micro_batch_size / data-parallel size), got {n}")
        return n

    def _mean_losses(self, losses: List[Dict[str, torch.Tensor]], group=None) -> Dict[str, torch.Tensor]:
        """Each key's mean over micro-batches and DP ranks, on the device (0-dim float64; one all-reduce, no
        check, no sync). The keys of ``_loss`` (or of a pipeline's reduced terms), 'total' first."""
        # on the loss's device (NCCL reduces CUDA tensors only), in float64 so the mean is exact enough;
        # each key summed on its own: 'total' exactly as the loss alone was before the terms were logged
        keys = list(losses[0])
        sums = torch.stack([torch.stack([m[k].detach().double().reshape(()) for m in losses]).sum() for k in keys])
        if self.dp_size > 1:
            dist.all_reduce(sums, group=group)
        return dict(zip(keys, (sums / (len(losses) * self.dp_size)).unbind()))

    @staticmethod
    def _step_metrics(means: Dict[str, torch.Tensor], grad_norm: Optional[torch.Tensor], lr: float,
                      nonfinite: torch.Tensor) -> dict:
        """What ``train_step`` returns, from ``_mean_losses``' output."""
        return {"loss": means["total"], "grad_norm": grad_norm, "lr": lr, "nonfinite": nonfinite,
                "terms": {k: v for k, v in means.items() if k != "total"}}

    def _count_nonfinite(self, flag: torch.Tensor) -> None:
        self._nonfinite_total = flag.clone() if self._nonfinite_total is None else self._nonfinite_total + flag

    def nonfinite_steps(self) -> int:
        """Steps skipped so far (reads the device counter: for checkpoints)."""
        return 0 if self._nonfinite_total is None else int(self._nonfinite_total.item())

    def _restore_nonfinite(self, counters: dict) -> int:
        skipped = int(counters.get("nonfinite_steps", 0))
        self._nonfinite_total = None if not skipped else torch.tensor(float(skipped))
        return skipped


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
