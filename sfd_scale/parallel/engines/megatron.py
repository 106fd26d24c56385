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
(``grad_reduce_in_fp32``); the objective's forward runs under autocast (``Engine.forward_precision``). In fp32
everything is fp32. Weight decay applies to every parameter, as in the plain engine (``config_overrides={}``
turns off megatron's default of exempting biases and norms).

Optimizer step, without a host sync: megatron's ``optimizer.step()`` reads the grad norm on the host
(``get_grad_norm_fp32`` returns ``.item()``; its no-apex/TE fallback ``local_multi_tensor_l2_norm`` even
converts every per-tensor norm to a Python float: ~350 syncs per XXL step) and clips with a host float.
``_step`` runs megatron's own phases instead: ``prepare_grads()`` (model grads -> fp32 main grads),
the global norm of ``get_main_grads_for_grad_norm()`` with ``torch._foreach_norm`` summed over
``get_grad_stats_parallel_group()`` on the device, clipping by a device coefficient (``_foreach_mul_``;
megatron's ``clip_coeff < 1`` test becomes ``min(coeff, 1)``: multiplying by 1.0 is exact), then
``step_with_ready_grads()`` (Adam + main -> model params / all-gather) under ``skip_unless_finite``.
Without TransformerEngine / apex megatron builds torch's AdamW with its default (foreach / single-tensor)
kernels; ``_fuse_torch_adam`` switches those param groups to torch's fused AdamW (same arithmetic, takes
the ``found_inf`` skip flag) and the engine notes the fallback for the run log.

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

from ...config import Config
from ...diffusion.micro_batch import MicroBatch
from ..cpu_compat import megatron_on_cpu
from ..pipeline import forward_backward
from .base import (ADAM_KINDS, Engine, MasterPiece, Objective, adam_state, is_fused_adam, micro_batch_layout,
                   nonfinite_flag, skip_unless_finite, state_kinds, warmup_factor)

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


# ----------------------------------------------------------------------------------------------- step
def _fuse_torch_adam(optimizer) -> List[str]:
    """Switch megatron's torch-AdamW fallback (no TE / apex) to torch's fused kernel where every parameter
    allows it (floating point, on CPU or CUDA), before the first step. Returns notes for the run log."""
    import megatron.core.optimizer as mcore_optimizer

    if not getattr(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False):
        return []
    notes = ["megatron-core found neither TransformerEngine nor apex: its optimizer falls back to torch's AdamW"]
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW) or is_fused_adam(inner):
            continue
        params = [p for g in inner.param_groups for p in g["params"]]
        if any(inner.state.get(p) for p in params):
            raise RuntimeError("_fuse_torch_adam must run before the optimizer's first step")
        if all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
            for group in inner.param_groups:  # what AdamW(fused=True) sets; read by every step
                group["fused"], group["foreach"] = True, False
            inner.defaults.update(fused=True, foreach=False)
            inner._step_supports_amp_scaling = True
            notes[0] += " (switched to torch's fused AdamW)"
        else:
            notes[0] += " (torch's non-fused AdamW: its parameters do not allow the fused kernel)"
    return notes


@torch.no_grad()
def _grad_norm(optimizer) -> torch.Tensor:
    """Global L2 norm of the main grads, as megatron's ``get_grad_norm_fp32`` counts it (no shared or TP
    duplicate parameters, summed over the grad-stats group), left on the device."""
    subs = [s for s in getattr(optimizer, "chained_optimizers", [optimizer])
            if not getattr(s, "is_stub_optimizer", False)]
    grads = [g for sub in subs for g in sub.get_main_grads_for_grad_norm()]
    device = grads[0].device if grads else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    squares = torch.zeros(1, dtype=torch.float32, device=device)
    if grads:
        squares += torch.stack(torch._foreach_norm(grads)).float().square().sum()
    groups = {id(g): g for g in (sub.get_grad_stats_parallel_group() for sub in subs)}
    for group in groups.values():  # one group unless the chained optimizers disagree
        torch.distributed.all_reduce(squares, group=group)
    return squares[0].sqrt()


@torch.no_grad()
def _clip_main_grads(optimizer, max_norm: float, grad_norm: torch.Tensor) -> None:
    grads = [p.grad for sub in getattr(optimizer, "chained_optimizers", [optimizer])
             for p in sub.get_parameters() if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (grad_norm + 1.0e-6), max=1.0))


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
                if isinstance(getattr(chunk, "config", None), TransformerConfig):
                    # the schedules allocate the received activations in pipeline_dtype: bf16 now too
                    # (fp32 buffers filled from bf16 sends gave NaN losses on every step)
                    chunk.config.pipeline_dtype = torch.bfloat16
        p, o = cfg.parallel, cfg.optim
        overlap = p.overlap_grad_reduce if p.overlap_grad_reduce is not None else self.dp_size > 1
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=bf16, overlap_grad_reduce=overlap,
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
        self.notes = _fuse_torch_adam(self.optimizer)
        self.bf16, self.overlap_grad_reduce = bf16, overlap
        self._ema_sources, self._pieces = None, None
        self.model = self.chunks[0]
        self.local_modules = chunks
        self.module = chunks if self.pipelined else chunks[0]
        self.scheduler = WarmupSchedule(lambda: self.optimizer.param_groups, o.lr, o.warmup_steps)

    def _sub_optimizers(self):
        return getattr(self.optimizer, "chained_optimizers", [self.optimizer])

    def train_step(self, micro_batches: Sequence[MicroBatch], objective: Objective) -> dict:
        """With pipeline stages megatron's 1F1B / interleaved schedule runs ``objective`` (the ``SFDObjective``)
        over the stages, each micro-batch carrying its draw to every stage (``pipeline.forward_backward``)."""
        n = self._check_micro_batches(micro_batches)
        with _megatron_call():
            for ddp in self.chunks:
                ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
        if self.pipelined:
            with self.forward_precision(), _quiet():  # (its backward ops keep their forward dtypes)
                terms = forward_backward(self.chunks, micro_batches, objective)
            names = objective.logged_names(repa=micro_batches[0].repa_target is not None)
            losses = [self._pipeline_terms(terms, names, micro_batches[0].x1.device)]
        else:
            losses = []
            for i, mb in enumerate(micro_batches):  # (overlap_grad_reduce: bucket reduces start in backward)
                with self.model.no_sync() if i < n - 1 else contextlib.nullcontext(), _quiet():
                    terms = self._loss(objective, mb)
                    loss = terms["total"]
                    (loss if n == 1 else loss / n).backward()
                losses.append(terms)
        with _megatron_call():
            finalize_model_grads(self.chunks)
            means = self._mean_losses(losses, self.dp_group)
            lr = self.optimizer.param_groups[0]["lr"]
            grad_norm, nonfinite = self._step(means["total"])
        self.scheduler.step()
        self._count_nonfinite(nonfinite)
        return self._step_metrics(means, grad_norm, lr, nonfinite)

    def _step(self, mean_loss: torch.Tensor):
        """megatron's optimizer step by its phases, with the grad norm, clipping and the skip on the device
        (module docstring). Returns (pre-clip grad norm, non-finite flag)."""
        if self.optimizer.prepare_grads():  # only with an fp16 loss scaler, which we never configure
            raise RuntimeError("megatron's grad scaler found inf / nan: sfd_scale configures no fp16 loss scaling")
        grad_norm = _grad_norm(self.optimizer) if self.cfg.optim.grad_clip > 0 else None
        nonfinite = nonfinite_flag(mean_loss, grad_norm)
        if grad_norm is not None:
            _clip_main_grads(self.optimizer, self.cfg.optim.grad_clip, grad_norm)
        skip_unless_finite(self.torch_optimizers(), nonfinite, self.optimizer.step_with_ready_grads)
        return grad_norm, nonfinite

    def torch_optimizers(self) -> list:
        return [s.optimizer for s in self._sub_optimizers() if not getattr(s, "is_stub_optimizer", False)]

    def ema_sources(self) -> List[torch.Tensor]:
        """Whole EMA: fp32 masters of the non-distributed bf16 optimizer (whole on every rank); the parameters
        otherwise (fp32 runs: they are the masters; distributed optimizer: each rank holds a shard of the
        masters). Sharded EMA: the distributed optimizer's fp32 shards (``master_pieces``)."""
        if self._ema_sources is None:
            if self.shard_ema:
                self._ema_sources = super().ema_sources()
            else:
                main = _main_params(self.optimizer)
                self._ema_sources = [main[p][1] if p in main else p
                                     for named in self._named_parameters() for _, p in named]
        return self._ema_sources

    def master_pieces(self) -> List[MasterPiece]:
        """The distributed optimizer's shard of every trainable parameter on this rank: the fp32 main param
        shard Adam updates (fp32 runs: a view into the parameter itself; bf16: megatron's fp32 copy), at the
        parameter's range in the grad buffer's DP partition. The same tensors across steps and loads (both
        write into them in place)."""
        if self._pieces is None:
            trained = [p for named in self._named_parameters() for _, p in named]
            whole = _main_params(self.optimizer)  # parameters of a non-distributed (sub-)optimizer
            if whole.keys() & set(trained) or not any(isinstance(s, DistributedOptimizer)
                                                     for s in self._sub_optimizers()):
                raise RuntimeError("a sharded EMA needs megatron's distributed optimizer over every parameter")
            pieces = []
            for index, p in enumerate(trained):
                frag = _fragment(self.optimizer, p)
                if frag is None:  # no element of this parameter in this rank's partition
                    continue
                sub, r = frag
                gi, go = sub.model_param_group_index_map[p]
                main = sub.optimizer.param_groups[gi]["params"][go]
                if r.end > r.start:
                    pieces.append(MasterPiece(index, r.start, main.detach().view(-1)))
            self._pieces = pieces
        return self._pieces

    @property
    def master_group(self):
        return self.dp_group

    def grad_reduce_dtype(self) -> str:
        how = "reduce-scatter" if self.cfg.parallel.distributed_optimizer else "all-reduce"
        overlap = ", overlapped with backward" if self.overlap_grad_reduce else ""
        return f"{'float32' if self.bf16 else 'float32 (weights)'} {how}{overlap}"

    @staticmethod
    def _pipeline_terms(terms: dict, names: Tuple[str, ...], device: torch.device) -> Dict[str, torch.Tensor]:
        """The step's mean total loss and logged terms (``names``) on every stage: the last stage's terms plus
        the REPA term of the stage owning the projector (when that is not the last), summed over the pipeline
        group (a stage that has a term contributes it, the others 0; on the device: no host read)."""
        keys = ("total",) + names
        local = torch.zeros(len(keys), dtype=torch.float64, device=device)
        for i, key in enumerate(keys):
            if key in terms:
                local[i] += terms[key].detach().double().to(device)
        if "repa_loss_aux" in terms:
            local[0] += terms["repa_loss_aux"].detach().double().to(device)
        torch.distributed.all_reduce(local, group=parallel_state.get_pipeline_model_parallel_group())
        return dict(zip(keys, local.unbind()))

    def _named_parameters(self):
        return [[(n, p) for n, p in chunk.named_parameters() if p.requires_grad] for chunk in self.local_modules]

    def state_dict(self) -> dict:
        steps = self.scheduler.steps
        counters = {"optimizer_steps": steps, "nonfinite_steps": self.nonfinite_steps()}
        steps -= counters["nonfinite_steps"]  # Adam's own step count
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
        steps = counters["optimizer_steps"] - self._restore_nonfinite(counters)  # Adam's own step count
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
        self.scheduler.load_state_dict({"steps": counters["optimizer_steps"]})
