"""Megatron-core data-parallel engine: DDP with contiguous grad buffers + megatron's optimizer.

With pipeline parallelism the engine holds this rank's model chunks (one DDP each) and the micro-batches
go through ``pipeline.forward_backward`` (megatron's schedules) instead of the plain loop below.

One optimizer step follows megatron-core's own loop (``training.py`` train_step and the no-pipeline
schedule ``forward_backward_no_pipelining``): ``zero_grad_buffer()`` + ``optimizer.zero_grad()``; every
micro-batch but the last inside ``model.no_sync()`` (grads only accumulate into the fp32/bf16 main-grad
buffer); ``finalize_model_grads([model])`` (all-reduce, or reduce-scatter for the distributed optimizer;
waits for the overlapped bucket reduces); ``optimizer.step()`` (unscale, global grad norm, clip, Adam,
all-gather of the updated shards); LR schedule step.

Precision: with ``train.precision == 'bf16'`` the module's weights are bf16 and megatron keeps fp32 main
params in the optimizer (``OptimizerConfig(bf16=True)``), gradients are accumulated and reduced in fp32
(``grad_reduce_in_fp32``); the caller's ``loss_fn`` runs the forward under autocast. In fp32 everything is
fp32. Weight decay applies to every parameter, as in the plain engine (``config_overrides={}`` turns off
megatron's default of exempting biases and norms).

LR schedule: ``WarmupSchedule``, the plain engine's LambdaLR arithmetic on megatron's param groups
(megatron's ``OptimizerParamScheduler`` starts warmup at ``init_lr`` with ``step / warmup``, which is
not the ``(step + 1) / warmup`` of the single-process trainer).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, List, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.transformer import TransformerConfig

from ..config import Config
from .cpu_compat import megatron_on_cpu
from .engines import Engine, LossFn, micro_batch_layout, snapshot, warmup_factor

# Known noise from inside megatron-core: its optimizer reads ``.grad`` of shard views (non-leaf tensors)
# to test for presence, and its DDP / distributed optimizer call the deprecated-in-torch-2.14 names of
# reduce-scatter / all-gather.
_NOISE = ("The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
          "`torch.distributed.reduce_scatter_tensor` is deprecated",
          "`torch.distributed.all_gather_into_tensor` is deprecated")


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        for message in _NOISE:
            warnings.filterwarnings("ignore", message=message)
        yield


@contextlib.contextmanager
def _megatron_call():
    """CPU redirections (no-op on GPU) and megatron's known warning noise silenced."""
    with megatron_on_cpu(), _quiet():
        yield


class WarmupSchedule:
    """lr = base_lr * min(1, (step + 1) / warmup), set on every param group (LambdaLR's arithmetic)."""

    def __init__(self, param_groups: Callable[[], List[dict]], base_lr: float, warmup: int):
        # a callable: loading optimizer state replaces torch's param-group dicts
        self.param_groups, self.base_lr, self.warmup, self.steps = param_groups, base_lr, max(warmup, 0), 0
        self._apply()

    def _apply(self) -> None:
        lr = self.base_lr * warmup_factor(self.steps, self.warmup)
        for group in self.param_groups():
            group["lr"] = lr

    def step(self) -> None:
        self.steps += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self._apply()


def _transformer_config(module: torch.nn.Module) -> TransformerConfig:
    config = getattr(module, "config", None)
    if isinstance(config, TransformerConfig):
        return config
    a = module.args
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter about CUDA-graph defaults
        return TransformerConfig(num_layers=a.depth, hidden_size=a.hidden_size, num_attention_heads=a.num_heads,
                                 tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size())


# ----------------------------------------------------------------------------------------------- reload fix
# megatron-core's DistributedOptimizer state save / load on the torch-AdamW path (no Apex / TE: what CPU
# and many GPU installs run) has three bugs (ENVIRONMENT.md):
#   (1) ``state_dict()`` asserts (``len(steps) == 1``) on an optimizer that has not stepped yet;
#   (2) ``load_state_dict`` puts a 'step' into every param state, so loading param states that lack
#       'step' (e.g. the dp_zero format) raises KeyError 'step';
#   (3) ``load_state_dict`` assigns ONE ``torch.tensor(step)`` object to every param's state; torch AdamW
#       increments ``state['step']`` in place per parameter, so after a reload the shared step advances N
#       times per optimizer step and bias correction is wrong from the first step on (silent divergence);
#   (4) ``get_parameter_state_dp_reshardable()`` and its inverse ``load_parameter_state_from_dp_reshardable``
#       disagree: the loader reads ``entry['padding']``, which only the dist-checkpointing path writes
#       (KeyError 'padding' on an in-memory round trip).
# Our wrapper: never call ``state_dict()`` on an un-stepped optimizer (save step 0 and no param state:
# there is nothing to restore); save this rank's shards (dp_reshardable: no communication, same DP
# layout on reload) with 'step' and 'padding' in every param entry; after megatron's load, give every
# param state its own step tensor. The rest (param-group matching, shard allocation, copying into the shards) stays megatron's.
def _step_of(dopt: DistributedOptimizer) -> int:
    # Adam's own per-parameter counters only: a param group's "step" (restored from a saved state dict)
    # belongs to megatron's LR scheduler, which we do not use, and is never advanced by the optimizer.
    steps = {float(s["step"]) for s in dopt.optimizer.state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameters disagree on the step count: {sorted(steps)}")
    return int(steps.pop()) if steps else 0


def save_distributed_optimizer(dopt: DistributedOptimizer) -> dict:
    step = _step_of(dopt)
    if not dopt.optimizer.state:  # fix (1): nothing has been stepped, nothing to save but the step
        return {"step": 0}
    param_state = snapshot(dopt.get_parameter_state_dp_reshardable())
    for gbuf in (v for k, v in param_state.items() if isinstance(k, int)):
        for buckets in gbuf.values():
            for bucket in buckets:
                for entry in bucket:
                    entry["step"] = torch.tensor(float(step))  # fix (2): every entry carries its step
                    entry["padding"] = False  # fix (4): the loader filters on a key the getter never sets
    return {"step": step, "common": snapshot(dopt.state_dict()), "param_state": param_state}


def load_distributed_optimizer(dopt: DistributedOptimizer, saved: dict) -> None:
    if saved["step"] == 0:  # saved before the first step: a fresh optimizer is already in that state
        return
    with torch.no_grad():  # the shards copied into are views of parameters that require grad
        dopt.load_state_dict({**saved["common"], "param_state": saved["param_state"],
                              "param_state_sharding_type": "dp_reshardable"})
    for state in dopt.optimizer.state.values():  # fix (3): one step tensor per parameter
        if "step" in state:
            state["step"] = torch.tensor(float(saved["step"]), dtype=state["step"].dtype,
                                         device=state["step"].device)
    assert _step_of(dopt) == saved["step"]


# ----------------------------------------------------------------------------------------------- engine
class MegatronEngine(Engine):
    name = "megatron"

    def __init__(self, model, cfg: Config):
        """``model``: one LightningDiT, or the list of this rank's pipeline chunks (``pipeline.build_stages``)."""
        self.cfg = cfg
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.micro_batch_size, self.num_micro_batches = micro_batch_layout(cfg, self.dp_size)
        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
        bf16 = cfg.train.precision == "bf16"
        if bf16:
            for chunk in chunks:
                chunk.bfloat16()
        p, o = cfg.parallel, cfg.optim
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=bf16, overlap_grad_reduce=p.overlap_grad_reduce,
                                                   use_distributed_optimizer=p.distributed_optimizer)
        opt_config = OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.lr, weight_decay=o.weight_decay,
                                     adam_beta1=o.beta1, adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.grad_clip,
                                     bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                                     use_distributed_optimizer=p.distributed_optimizer)
        with _megatron_call():
            self.chunks = [DistributedDataParallel(_transformer_config(c), ddp_config, c) for c in chunks]
            for ddp in self.chunks:
                ddp.broadcast_params()  # replicas start identical even if their init RNG did not
            self.optimizer = get_megatron_optimizer(opt_config, self.chunks, config_overrides={})
        self.model = self.chunks[0]
        self.module = chunks if self.pipelined else chunks[0]
        self.scheduler = WarmupSchedule(lambda: self.optimizer.param_groups, o.lr, o.warmup_steps)

    def _sub_optimizers(self):
        return getattr(self.optimizer, "chained_optimizers", [self.optimizer])

    def train_step(self, micro_batches: Sequence, loss_fn: LossFn) -> dict:
        """With pipeline stages, ``micro_batches`` are ``pipeline.MicroBatch`` and ``loss_fn`` is the
        ``SFDObjective``: megatron's 1F1B / interleaved schedule runs them over the stages."""
        n = self._check_micro_batches(micro_batches)
        with _megatron_call():
            for ddp in self.chunks:
                ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
        if self.pipelined:
            from .pipeline import forward_backward

            with _quiet():
                terms = forward_backward(self.chunks, micro_batches, loss_fn)
            losses = [self._pipeline_loss(terms)]
        else:
            losses = []
            for i, mb in enumerate(micro_batches):  # (overlap_grad_reduce: bucket reduces start in backward)
                with self.model.no_sync() if i < n - 1 else contextlib.nullcontext(), _quiet():
                    loss = loss_fn(self.model, mb)
                    (loss if n == 1 else loss / n).backward()
                losses.append(loss.detach())
        with _megatron_call():
            finalize_model_grads(self.chunks)
            mean = self._mean_loss(losses, self.dp_group)
            lr = self.optimizer.param_groups[0]["lr"]
            ok, grad_norm, _ = self.optimizer.step()
        if not ok:  # only with an fp16 loss scaler, which we never configure
            raise FloatingPointError("megatron optimizer skipped the step (inf / nan gradients)")
        self.scheduler.step()
        return {"loss": mean, "grad_norm": None if grad_norm is None else float(grad_norm), "lr": lr}

    @staticmethod
    def _pipeline_loss(terms: dict) -> torch.Tensor:
        """The step's mean total loss on every stage: the last stage's main terms plus the REPA term of
        the stage owning the projector (when that is not the last), summed over the pipeline group."""
        local = torch.tensor([terms.get("total", 0.0) + terms.get("repa_loss_aux", 0.0)], dtype=torch.float64)
        torch.distributed.all_reduce(local, group=parallel_state.get_pipeline_model_parallel_group())
        return local[0]

    def state_dict(self) -> dict:
        with _megatron_call():
            opts = [save_distributed_optimizer(sub) if isinstance(sub, DistributedOptimizer)
                    else {"state": snapshot(sub.state_dict())} for sub in self._sub_optimizers()]
        return {"optimizer": opts, "scheduler": self.scheduler.state_dict(),
                "engine": {"dp_size": self.dp_size, "distributed_optimizer": self.cfg.parallel.distributed_optimizer}}

    def load_state_dict(self, state: dict) -> None:
        saved = state["engine"]
        if (saved["dp_size"], saved["distributed_optimizer"]) != (self.dp_size, self.cfg.parallel.distributed_optimizer):
            raise ValueError(f"optimizer state was saved with data-parallel size {saved['dp_size']} and "
                             f"parallel.distributed_optimizer={saved['distributed_optimizer']}; this run has "
                             f"{self.dp_size} and {self.cfg.parallel.distributed_optimizer}")
        with _megatron_call():
            for sub, sub_state in zip(self._sub_optimizers(), state["optimizer"], strict=True):
                if isinstance(sub, DistributedOptimizer):
                    load_distributed_optimizer(sub, sub_state)
                else:
                    sub.load_state_dict(sub_state["state"])
        self.scheduler.load_state_dict(state["scheduler"])

