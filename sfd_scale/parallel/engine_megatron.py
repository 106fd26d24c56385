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
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.transformer import TransformerConfig

from ..config import Config
from .cpu_compat import megatron_on_cpu
from .engines import ADAM_KINDS, Engine, LossFn, adam_state, micro_batch_layout, state_kinds, warmup_factor

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


# ----------------------------------------------------------------------------------------------- state
# Why not megatron's own optimizer state_dict / load_state_dict: on the torch-AdamW path (no Apex / TE:
# what CPU and many GPU installs run) its DistributedOptimizer reload (1) asserts on an optimizer that has
# not stepped, (2) raises KeyError 'step' on param states without one, (3) loads ONE shared step tensor
# into every parameter, which torch AdamW then advances N times per step (silent divergence), and (4) its
# dp_reshardable getter and loader disagree on a 'padding' key (ENVIRONMENT.md). Its formats are also tied
# to the DP size. We read and write each parameter's fragment through the optimizer's own accessors
# (``_get_main_param_and_optimizer_states``, ``_get_model_param_range_map``) instead: every parameter's
# full state is the sum over DP ranks of their fragments (each element lives on exactly one rank).
def _main_params(optimizer) -> Dict[torch.nn.Parameter, Tuple[torch.optim.Optimizer, torch.Tensor]]:
    """model param -> (torch optimizer, its main param) for megatron's non-distributed optimizers."""
    out = {}
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, DistributedOptimizer):
            continue
        if hasattr(sub, "float16_groups"):  # bf16 weights, fp32 main copies
            pairs = [(m, f) for mg, fg in zip(sub.float16_groups, sub.fp32_from_float16_groups) for m, f in zip(mg, fg)]
            pairs += [(p, p) for g in sub.fp32_from_fp32_groups for p in g]
        else:  # FP32Optimizer: Adam runs on the model's own parameters
            pairs = [(p, p) for g in sub.optimizer.param_groups for p in g["params"]]
        out.update({m: (sub.optimizer, f) for m, f in pairs})
    return out


def _fragment(optimizer, param):
    """(DistributedOptimizer, range of ``param``'s flat elements this rank updates), or None."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, DistributedOptimizer) and param in sub.model_param_group_index_map:
            return sub, sub._get_model_param_range_map(param)["param"]
    return None


def _fragment_tensors(sub: DistributedOptimizer, param, steps: int) -> dict:
    """{'master', 'exp_avg', 'exp_avg_sq'}: live flat tensors of this rank's fragment of ``param``."""
    gi, go = sub.model_param_group_index_map[param]
    adam_state(sub.optimizer, sub.optimizer.param_groups[gi]["params"][go], steps)
    t = sub._get_main_param_and_optimizer_states(param)
    return {"master": t["param"], "exp_avg": t["exp_avg"], "exp_avg_sq": t["exp_avg_sq"]}


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
        self.local_modules = chunks
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

    def _named_parameters(self):
        return [[(n, p) for n, p in chunk.named_parameters() if p.requires_grad] for chunk in self.local_modules]

    def state_dict(self) -> dict:
        steps = self.scheduler.steps
        counters = {"optimizer_steps": steps}
        if not steps:
            return {"params": [{} for _ in self.local_modules], "counters": counters}
        kinds, main = state_kinds(self.cfg), _main_params(self.optimizer)
        params = []
        with _megatron_call():
            for named in self._named_parameters():
                out = {}
                for name, p in named:
                    if p in main:
                        opt, m = main[p]
                        state = opt.state[m]
                        out[name] = {k: (m if k == "master" else state[k]).detach().float().clone() for k in kinds}
                        continue
                    full = {k: torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for k in kinds}
                    frag = _fragment(self.optimizer, p)
                    if frag is not None:
                        sub, r = frag
                        local = _fragment_tensors(sub, p, steps)
                        for k in kinds:
                            full[k][r.start:r.end] = local[k].detach().view(-1)
                    for k in kinds:  # each element is held by exactly one DP rank: the sum is a gather
                        torch.distributed.all_reduce(full[k], group=self.dp_group)
                    out[name] = {k: v.view(p.shape) for k, v in full.items()}
                params.append(out)
        return {"params": params, "counters": counters}

    def load_state_dict(self, state: dict) -> None:
        counters = state["counters"]
        steps = counters["optimizer_steps"]
        if steps:
            main = _main_params(self.optimizer)
            with _megatron_call(), torch.no_grad():
                for named, saved in zip(self._named_parameters(), state["params"], strict=True):
                    for name, p in named:
                        src = dict(saved[name])
                        src.setdefault("master", p.detach().float())  # fp32 runs: the weights are the master
                        if p in main:
                            opt, m = main[p]
                            own = adam_state(opt, m, steps)
                            for k in ADAM_KINDS:
                                own[k].copy_(src[k])
                            if m is not p:
                                m.copy_(src["master"])
                            continue
                        frag = _fragment(self.optimizer, p)
                        if frag is not None:
                            sub, r = frag
                            for k, t in _fragment_tensors(sub, p, steps).items():
                                t.view(-1).copy_(src[k].reshape(-1)[r.start:r.end])
        self.scheduler.load_state_dict({"steps": steps})
