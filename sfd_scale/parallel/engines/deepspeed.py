"""DeepSpeed ZeRO engine (stage 1 / 2 / 3), configured from our config.

* Optimizer: a client ``torch.optim.AdamW`` (fused where supported, as in the plain engine) handed to
  ``deepspeed.initialize``; ZeRO re-points its param groups at the flat fp32 partitions of this rank.
  DeepSpeed's own Adam would JIT-compile an extension (CPU: cpu_adam; GPU: FusedAdam) at start-up, and
  torch's AdamW gives the same arithmetic as the other engines (``zero_allow_untested_optimizer``).
* LR: the plain engine's LambdaLR warmup, built by DeepSpeed on that optimizer (client callable), stepped
  by ``engine.step()`` at each gradient-accumulation boundary.
* ``gradient_clipping`` is always written (DeepSpeed's default is 1.0, not off): ``optim.grad_clip``,
  0 -> 0.0. ``train_micro_batch_size_per_gpu`` x ``gradient_accumulation_steps`` x DP =
  ``train.global_batch_size``; DeepSpeed divides each micro-batch loss by the accumulation steps itself.
* ``train.precision == 'bf16'``: DeepSpeed's bf16 mode (bf16 module, fp32 master weights in the ZeRO
  partitions); the objective's forward runs under autocast (``Engine.forward_precision``).
* A non-finite loss skips the update on the device: the flag goes to the client AdamW as ``found_inf``
  (fused kernel; ``base.skip_unless_finite``) and DeepSpeed's boundary step runs as usual (its counters and
  LR schedule advance, as on every engine). Non-finite gradients under a finite loss: DeepSpeed's own check
  (fp32: ``is_invalid_grad_norm``, a host read inside DeepSpeed) skips the inner step; then the LR schedule,
  which DeepSpeed holds back on an overflow, is advanced here so that it counts every step. In bf16 DeepSpeed
  does not check gradients and only the loss is checked. With a non-fused optimizer (``optim.fused=false``) the
  flag is read on the host and a skipped step is discarded as DeepSpeed discards an fp16 overflow (every stage).
* ZeRO-3 partitions the weights too: the forward gathers them layer by layer (DeepSpeed's hooks on
  ``engine.model``); whoever reads ``module``'s weights whole (checkpoints, tests) does so inside
  ``full_parameters()`` (``modify=True`` to load them). The EMA follows this rank's fp32 partitions
  (``master_pieces``; sharded EMA, ``train/ema.py``), also at ZeRO-1/2 with ``parallel.shard_ema`` (default
  with DP > 1).
* Without a GPU DeepSpeed picks its CPU accelerator and gloo. Its first communication setup compiles a
  shared-memory op with g++ (~40 s) into ``TORCH_EXTENSIONS_DIR``; we default that to a per-user cache
  (``$XDG_CACHE_HOME or ~/.cache`` / sfd_scale/torch_extensions) so each spawned rank and each later run
  reuses the build. Set ``TORCH_EXTENSIONS_DIR`` (e.g. into the CI build dir) to put it elsewhere.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import List, Sequence

import torch
import torch.distributed as dist

from ...config import Config, ConfigError
from ...diffusion.micro_batch import MicroBatch
from .base import (ADAM_KINDS, Engine, MasterPiece, Objective, adam_state, fused_adamw, is_fused_adam, lambda_lr_at,
                   micro_batch_layout, nonfinite_flag, set_lr, state_kinds, warmup_factor)

_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def _trained(module: torch.nn.Module):
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def extensions_dir() -> str:
    """Where torch / DeepSpeed JIT extensions are cached (set as TORCH_EXTENSIONS_DIR unless already set)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache / "sfd_scale" / "torch_extensions"))
    return os.environ["TORCH_EXTENSIONS_DIR"]


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    micro, accum = micro_batch_layout(cfg, dp_size)
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(cfg.optim.grad_clip),  # explicit: DeepSpeed's default is 1.0
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # torch AdamW as client optimizer
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, cfg: Config):
        if cfg.parallel.tensor_parallel > 1 or cfg.parallel.pipeline_parallel > 1:
            raise ConfigError("parallel.engine='deepspeed' is data-parallel only: parallel.tensor_parallel and "
                              "parallel.pipeline_parallel must be 1 (use the megatron engine for TP / PP)")
        extensions_dir()
        import deepspeed

        self.cfg, self.notes = cfg, []
        self.dp_size = dist.get_world_size() if dist.is_initialized() else 1
        self.dp_rank = dist.get_rank() if dist.is_initialized() else 0
        self.micro_batch_size, self.num_micro_batches = micro_batch_layout(cfg, self.dp_size)
        o = cfg.optim
        device = next(model.parameters()).device
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                      weight_decay=o.weight_decay, fused=fused_adamw(cfg, device))
        warmup = max(o.warmup_steps, 0)

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_factor(s, warmup))

        self.model, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(cfg, self.dp_size),
                                                   dist_init_required=not dist.is_initialized())
        self.module = self.model.module
        self._pieces = None

    @property
    def zero_stage(self) -> int:
        return self.model.zero_optimization_stage()

    @property
    def partitions_weights(self) -> bool:
        return self.zero_stage == 3

    @contextlib.contextmanager
    def full_parameters(self, modify: bool = False):
        if self.zero_stage < 3:
            yield self.module
            return
        import deepspeed

        # modifier_rank=0: rank 0's (= every rank's) values are partitioned again on exit
        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=0 if modify else None):
            yield self.module

    def master_pieces(self) -> List[MasterPiece]:
        """This rank's fp32 partition of every trainable parameter, through DeepSpeed's accessors, read once (the
        flat fp32 partitions are the same tensors for the whole run: steps and loads write into them). ZeRO-3:
        ``safe_get_local_fp32_param`` (a parameter's partition, padded past its end on the last ranks; the
        padding is left out); ZeRO-1/2: the fragment DeepSpeed maps the parameter to (``_hp_mapping``)."""
        if self._pieces is None:
            from deepspeed.utils import safe_get_local_fp32_param

            zero, pieces = self.model.optimizer, []
            for index, (_, p) in enumerate(_trained(self.module)):
                if self.zero_stage == 3:
                    local = safe_get_local_fp32_param(p)
                    start = zero._get_param_partition_rank(p) * local.numel()
                    held = min(local.numel(), p.ds_numel - start)
                    if held > 0:
                        pieces.append(MasterPiece(index, start, local.detach().narrow(0, 0, held)))
                elif getattr(p, "_hp_mapping", None) is not None:
                    m = p._hp_mapping
                    pieces.append(MasterPiece(index, m.lp_fragment_address.start, m.hp_fragment.detach()))
            self._pieces = pieces
        return self._pieces

    @property
    def master_group(self):
        return self.model.optimizer.dp_process_group

    def train_step(self, micro_batches: Sequence[MicroBatch], objective: Objective) -> dict:
        n = self._check_micro_batches(micro_batches)
        counters_before = {k: getattr(self.model, k) for k in _COUNTERS}
        losses = []
        for i, mb in enumerate(micro_batches):
            terms = self._loss(objective, mb)
            self.model.backward(terms["total"])  # scales by 1 / gradient_accumulation_steps; reduces at the boundary
            losses.append(terms)
            if i < n - 1:
                self.model.step()  # not a boundary: only counts the micro-step
        means = self._mean_losses(losses)
        mean = means["total"]
        bad_loss = nonfinite_flag(mean, None)
        lr = self.model.get_lr()[0]
        inner = self.torch_optimizers()
        if all(is_fused_adam(o) for o in inner):
            for o in inner:
                o.grad_scale, o.found_inf = None, bad_loss
            self.model.step()  # boundary: clip, optimizer step (skipped by the kernel on a bad loss), LR schedule
        elif bad_loss.device.type != "meta" and bool(bad_loss):  # non-fused: read on the host (module docstring)
            self._discard(counters_before)
            return self._metrics(means, lr, bad_loss, None)
        else:
            self.model.step()
        overflow = bool(getattr(self.model.optimizer, "overflow", False))  # a Python bool DeepSpeed already read
        if overflow:  # DeepSpeed skipped the inner step itself and held the LR schedule back
            self.model.lr_scheduler.step()
        nonfinite = torch.clamp(bad_loss + float(overflow), max=1.0)  # exactly the steps whose update was skipped
        return self._metrics(means, lr, nonfinite, self.model.get_global_grad_norm())

    def _metrics(self, means: dict, lr: float, nonfinite: torch.Tensor, norm) -> dict:
        self._count_nonfinite(nonfinite)
        clip = self.cfg.optim.grad_clip > 0 and norm is not None
        device = means["total"].device
        return self._step_metrics(means, torch.as_tensor(norm, dtype=torch.float32).to(device) if clip else None,
                                  lr, nonfinite)

    def torch_optimizers(self) -> list:
        return [self.model.optimizer.optimizer]

    def grad_reduce_dtype(self) -> str:
        return str(getattr(self.model, "communication_data_type", "unknown")).replace("torch.", "")

    def _discard(self, counters_before: dict) -> None:
        """What DeepSpeed's own ZeRO step does when it skips an overflowed fp16 step (clear the partitioned
        gradients: ZeRO-1/2 ``step``, ZeRO-3 ``_overflow_clean_up``), plus its micro-step counters put back, so
        the next step's accumulation boundary holds."""
        zero = self.model.optimizer
        zero.zero_grad(set_to_none=True)  # ZeRO-3: also restarts its micro-step count (the next backward copies)
        if self.zero_stage == 3:
            zero.averaged_gradients = {}  # (no optimizer offload is configured)
        else:
            if hasattr(zero, "_release_preflattened_grad_buffers"):
                zero._release_preflattened_grad_buffers()
            for k in zero.averaged_gradients.keys():
                zero.averaged_gradients[k] = None
                zero.all_grad_tensors[k] = None
        for k, v in counters_before.items():
            setattr(self.model, k, v)
        self.model.global_steps += 1  # every engine's step counters advance on a skipped step
        self.model.lr_scheduler.step()

    def state_dict(self) -> dict:
        """Through DeepSpeed's documented per-parameter accessors (``deepspeed.utils.safe_get_full_*``), which
        assemble each parameter's full fp32 state from the ZeRO partitions (a collective over DP)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        counters = {"optimizer_steps": self.model.global_steps, "nonfinite_steps": self.nonfinite_steps(),
                    "deepspeed": {k: getattr(self.model, k) for k in _COUNTERS}}
        params = {}
        if self.model.global_steps > counters["nonfinite_steps"]:
            kinds = state_kinds(self.cfg)
            for name, p in _trained(self.module):
                full = {k: safe_get_full_optimizer_state(p, k) for k in ADAM_KINDS}
                if "master" in kinds:
                    full["master"] = safe_get_full_fp32_param(p)
                params[name] = {k: v.detach().float().cpu().clone() for k, v in full.items()}
        return {"params": [params], "counters": counters}

    def load_state_dict(self, state: dict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        counters = state["counters"]
        steps = counters["optimizer_steps"]
        adam_steps = steps - self._restore_nonfinite(counters)
        saved = state["params"][0]
        # the fp32 masters, also without Adam state: ZeRO copied them from the weights when it was built, before
        # the trainer loaded the checkpoint's weights
        with self.full_parameters():  # ZeRO-3: gathered, so the fp32 master can come from the weights
            masters = {name: saved.get(name, {}).get("master", p.detach().float().clone())
                       for name, p in _trained(self.module)}
        for name, p in _trained(self.module):
            safe_set_full_fp32_param(p, masters[name])
        if adam_steps:
            zero = self.model.optimizer
            flats = (zero.fp32_partitioned_groups_flat if self.zero_stage == 3  # the flat fp32 partitions
                     else [p for g in zero.optimizer.param_groups for p in g["params"]])
            for flat in flats:  # give them Adam state to load into
                adam_state(zero.optimizer, flat, adam_steps)
            if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link it after a first step
                zero._hp_optimizer_states_linked = False
                zero._lazy_init_hp_params_optimizer_state()
            for name, p in _trained(self.module):
                for k in ADAM_KINDS:
                    safe_set_full_optimizer_state(p, saved[name][k].to(torch.float32), k)
        set_lr(self.model.optimizer.param_groups, lambda_lr_at(self.model.lr_scheduler, steps))
        # DeepSpeed's own counters; derived from the step when the checkpoint came from another engine
        _, accumulation = micro_batch_layout(self.cfg, self.dp_size)
        derived = {"global_steps": steps, "global_samples": steps * self.cfg.train.global_batch_size,
                   "micro_steps": steps * accumulation, "skipped_steps": 0}
        for k, v in counters.get("deepspeed", derived).items():
            setattr(self.model, k, v)
