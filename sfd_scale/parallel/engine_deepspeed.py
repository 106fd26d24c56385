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
  partitions); the caller's ``loss_fn`` runs the forward under autocast.
* Without a GPU DeepSpeed picks its CPU accelerator and gloo. Its first communication setup compiles a
  shared-memory op with g++ (~40 s) into ``TORCH_EXTENSIONS_DIR``; we default that to a per-user cache
  (``$XDG_CACHE_HOME or ~/.cache`` / sfd_scale/torch_extensions) so each spawned rank and each later run
  reuses the build. Set ``TORCH_EXTENSIONS_DIR`` (e.g. into the CI build dir) to put it elsewhere.
"""
from __future__ import annotations

import contextlib
import enum
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from ..config import Config, ConfigError
from .engines import Engine, LossFn, fused_adamw, micro_batch_layout, snapshot, warmup_factor

_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
_PLAIN = (int, float, bool, str, type(None))  # exact types: an IntEnum is an int but not weights_only-loadable


def _weights_only_safe(obj) -> bool:
    """Loadable by ``torch.load(weights_only=True)`` (what our checkpoints use)."""
    if isinstance(obj, dict):
        return all(_weights_only_safe(k) and _weights_only_safe(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj) in (list, tuple) and all(_weights_only_safe(v) for v in obj)
    return isinstance(obj, (torch.Tensor, torch.dtype)) or type(obj) in _PLAIN


def _split_objects(state: dict):
    """(plain part, {key: attributes}) of a ZeRO optimizer state dict. DeepSpeed stores a few Python
    objects in it (the ``loss_scaler``, the ``zero_stage`` enum, ``param_slice_mappings`` for universal
    checkpoints) that ``weights_only`` loading refuses: we keep the plain attributes of each object (none
    of an enum) and, on load, put them back onto the fresh engine's own objects (same ZeRO stage and DP
    layout, checked)."""
    plain, objects = {}, {}
    for key, value in state.items():
        if _weights_only_safe(value):
            plain[key] = value
        else:
            attributes = {} if isinstance(value, enum.Enum) else getattr(value, "__dict__", {})
            objects[key] = {k: v for k, v in attributes.items() if _weights_only_safe(v)}
    return plain, objects


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

        self.cfg = cfg
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

    @property
    def zero_stage(self) -> int:
        return self.model.zero_optimization_stage()

    @contextlib.contextmanager
    def full_parameters(self):
        if self.zero_stage < 3:
            yield self.module
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            yield self.module

    def train_step(self, micro_batches: Sequence, loss_fn: LossFn) -> dict:
        n = self._check_micro_batches(micro_batches)
        losses = []
        for i, mb in enumerate(micro_batches):
            loss = loss_fn(self.model, mb)
            self.model.backward(loss)  # scales by 1 / gradient_accumulation_steps; reduces at the boundary
            losses.append(loss.detach())
            if i < n - 1:
                self.model.step()  # not a boundary: only counts the micro-step
        mean = self._mean_loss(losses)  # before the boundary step: a non-finite loss stops every rank
        lr = self.model.get_lr()[0]
        self.model.step()  # boundary: clip, optimizer step, LR schedule step
        grad_norm = self.model.get_global_grad_norm()
        return {"loss": mean, "grad_norm": None if grad_norm is None else float(grad_norm), "lr": lr}

    def state_dict(self) -> dict:
        optimizer, objects = _split_objects(snapshot(self.model.optimizer.state_dict()))
        return {"optimizer": optimizer, "optimizer_objects": objects,
                "scheduler": self.model.lr_scheduler.state_dict(),
                "engine": {"dp_size": self.dp_size, "zero_stage": self.zero_stage,
                           **{k: getattr(self.model, k) for k in _COUNTERS}}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["engine"]
        if (saved["dp_size"], saved["zero_stage"]) != (self.dp_size, self.zero_stage):
            raise ValueError(f"optimizer state was saved with data-parallel size {saved['dp_size']} and ZeRO stage "
                             f"{saved['zero_stage']}; this run has {self.dp_size} and {self.zero_stage}")
        optimizer = dict(state["optimizer"])
        live = self.model.optimizer.state_dict()
        for key, attributes in state.get("optimizer_objects", {}).items():
            optimizer[key] = live[key]
            for name, value in attributes.items():
                setattr(optimizer[key], name, value)
        per_rank = [None] * self.dp_size  # DeepSpeed indexes the list by DP rank; we hold this rank's part
        per_rank[self.dp_rank] = optimizer
        if self.zero_stage == 3:
            self.model.optimizer.load_state_dict(per_rank, load_optimizer_states=True)
        else:  # fp32 master partitions from the saved copy (exact), not re-derived from the module
            self.model.optimizer.load_state_dict(per_rank, load_optimizer_states=True, load_from_fp32_weights=True)
        self.model.lr_scheduler.load_state_dict(state["scheduler"])
        for k in _COUNTERS:
            setattr(self.model, k, saved[k])
