"""Counting what a training step would launch on a GPU, from the aten ops it dispatches (``cost_model.py``).

``OpCounter`` is a ``TorchDispatchMode``: it sees every aten op below autograd, forward and backward, and
sorts each op that touches a tensor on the counted device into

* GEMM (matmuls and convolutions) and attention (SDPA flash / efficient / CPU flash kernels, forward
  and backward), with FLOPs from ``torch.utils.flop_counter``'s registered formulas;
* non-GEMM kernels: every other op that would launch a kernel, with the bytes it reads and writes (the
  sum of its input and output tensors; an expanded input counts its stored elements only). NOT kernels:
  views and reshapes that alias (``OpOverload.is_view``), ``detach`` / ``alias``, allocations without a
  fill (``empty*``, ``new_empty*``), shape and metadata queries. ``_foreach_*`` / ``_fused_*`` ops count
  as CUDA's multi-tensor apply launches them (``multi_tensor_launches``);
* host-device syncs, counted with the sfd_scale (or other non-library) caller's ``file:line``:
  ``_local_scalar_dense`` (``.item()``, ``bool()`` / ``float()`` of a tensor), ops whose output shape
  depends on the data (``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing, ``equal``) and
  copies from the device to the host. On meta they cannot compute: the counter answers them itself
  (0, or all-True masks, or zeros on the host) so the step runs on.

Ops on host tensors are not counted when the counted device is not the CPU (the trainer's host-side
work is not GPU work); on a CPU run every op counts. Each op is attributed to a phase (set by the cost
model: inputs, optimizer, EMA, else the step) and, through ``torch.utils.module_tracker.ModuleTracker``,
to the transformer block ``blocks.i`` it ran in, forward or backward, or to the other module compiled on CUDA
(final layer, REPA projector: ``parallel/optimizations.COMPILED_HEADS``); ``OrderedModuleTracker`` says which
module's backward runs now.

``CudaAutocast`` is a ``TorchFunctionMode`` standing in for ``torch.autocast("cuda", bfloat16)`` on meta
and CPU tensors (autocast has no meta backend, and CPU autocast's op lists differ): it casts the inputs
of the ops CUDA autocast runs in low precision, and the fp32-list ops this model calls back to fp32; a
linear over trainable fp32 weights runs as ``models/master_linear.linear`` runs it under autocast. It
also routes ``F.scaled_dot_product_attention`` to the kernel the target device would run.
"""
from __future__ import annotations

import math
import os
import re
import traceback
from collections import Counter, defaultdict
from contextlib import contextmanager
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.module_tracker import ModuleTracker

from ..models.master_linear import master_weight_linear, uses_master_weight_path
from ..parallel.optimizations import COMPILED_HEADS

aten = torch.ops.aten

# ----------------------------------------------------------------------------------------------- op classes
# torch's FLOP formulas, keyed by overload packet; the attention ones by name
_FLOPS = dict(flop_counter.flop_registry)
ATTENTION = {p for p in _FLOPS if "attention" in str(p)}
GEMM = set(_FLOPS) - ATTENTION
# CPU's fused SDPA (what F.scaled_dot_product_attention runs on CPU tensors) has no registered formula:
# the same one as flash attention, from the shapes
ATTENTION |= {aten._scaled_dot_product_flash_attention_for_cpu,
              aten._scaled_dot_product_flash_attention_for_cpu_backward}
_FLOPS[aten._scaled_dot_product_flash_attention_for_cpu] = (
    lambda q, k, v, *a, out_val=None, **kw: flop_counter.sdpa_flop_count(q.shape, k.shape, v.shape))
_FLOPS[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
    lambda g, q, k, v, *a, out_val=None, **kw: flop_counter.sdpa_backward_flop_count(
        g.shape, q.shape, k.shape, v.shape))

NOT_KERNELS = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
               aten.detach, aten.alias, aten.lift_fresh, aten.set_, aten.resize_, aten.sym_size, aten.sym_stride,
               aten.sym_numel, aten.sym_storage_offset, aten.is_same_size, aten.is_contiguous, aten.record_stream,
               aten._unsafe_view}
SYNC_SCALAR = {aten._local_scalar_dense, aten.equal}
SYNC_SHAPE = {aten.nonzero, aten.masked_select, aten._unique, aten._unique2, aten.unique_dim,
              aten.unique_consecutive, aten.unique_dim_consecutive, aten.repeat_interleave}
SYNC_MASK_INDEX = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}

# CUDA's multi_tensor_apply: one launch per 320 blocks of 64 Ki elements, or per ~110 tensors (the
# depth-dependent tensor limit, 110 for one list down to 36 for five: the mean is taken)
_MTA_ELEMENTS, _MTA_TENSORS = 320 * 65536, 64


def multi_tensor_launches(numel: int, tensors: int) -> int:
    return max(1, math.ceil(numel / _MTA_ELEMENTS), math.ceil(tensors / _MTA_TENSORS))


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements ``t`` really addresses: broadcast (stride-0) dimensions count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        n *= size if stride else 1
    return n * t.element_size()


def _tensors(tree) -> List[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


# ----------------------------------------------------------------------------------------------- callers
_LIBRARIES = tuple({os.path.dirname(torch.__file__), os.path.dirname(os.__file__),
                    os.path.dirname(os.path.dirname(torch.__file__))})
_SELF = {os.path.abspath(__file__), os.path.abspath(__file__).replace("dispatch_count", "cost_model")}
_PRIVATE = re.compile(r"torch/(_[a-z]|utils/_|overrides)|contextlib")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def caller() -> str:
    """``file:line (function)`` of the innermost frame outside torch, the standard library, installed
    packages and the counter itself; ``via`` the innermost library function when there is one."""
    frames = [f for f in traceback.extract_stack() if os.path.abspath(f.filename) not in _SELF]
    via = None  # the outermost library frame below the caller that is not torch's dispatch machinery
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if path.startswith(_LIBRARIES):  # site-packages, also a virtualenv inside the checkout
            if not _PRIVATE.search(path):
                via = f"{os.path.basename(path)}:{frame.lineno} ({frame.name})"
            continue
        where = f"{os.path.relpath(path, _ROOT)}:{frame.lineno} ({frame.name})"
        return where + (f" via {via}" if via else "")
    return via or "?"


# ----------------------------------------------------------------------------------------------- tracker
class _EntryOrder:
    """A set of module names that remembers the order they were entered in (newest last)."""

    def __init__(self, names=()):
        self._names = dict.fromkeys(names)

    def add(self, name: str) -> None:
        self._names.pop(name, None)
        self._names[name] = None

    def remove(self, name: str) -> None:
        del self._names[name]

    def __contains__(self, name) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class OrderedModuleTracker(ModuleTracker):
    """torch's ``ModuleTracker`` whose ``parents`` keep the order modules were entered in. Why: in the backward
    the tracker enters a module when the gradients of its outputs are ready but leaves it only once the
    gradients of ALL its inputs are complete, so modules whose backward has ended stay among the parents (the
    final layer's conditioning input ``c`` is complete only after every block's backward). The module whose
    backward runs now is the newest one entered."""

    @property
    def parents(self) -> _EntryOrder:
        return self._parents

    @parents.setter
    def parents(self, names) -> None:  # ModuleTracker assigns a fresh {"Global"} after each backward
        self._parents = _EntryOrder(names)


# ----------------------------------------------------------------------------------------------- counter
# a module path ending in a block (its index) or in one of the other compiled modules (its name)
_SCOPE = re.compile(r"(?:^|\.)(?:blocks\.(\d+)|(" + "|".join(COMPILED_HEADS) + r"))$")


class OpCounter(TorchDispatchMode):
    """Counts of the ops run on ``device`` while active; see the module docstring for the rules."""

    def __init__(self, device: torch.device, tracker: Optional[OrderedModuleTracker] = None):
        super().__init__()
        self.device = torch.device(device)
        self.tracker = tracker
        self.phase = "step"
        # (phase, block index / compiled head's name / None) -> {"gemm_flops", "attention_flops", "gemm_kernels",
        # "attention_kernels", "kernels", "bytes"}
        self.totals: Dict[tuple, Counter] = defaultdict(Counter)
        self.ops: Counter = Counter()          # non-GEMM aten op name -> kernels
        self.syncs: Counter = Counter()        # (op, caller) -> count

    @contextmanager
    def in_phase(self, name: str):
        old, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = old

    def _scope(self) -> Union[int, str, None]:
        """The transformer block (its index) or the other compiled module (its name, ``COMPILED_HEADS``) whose
        forward or backward the current op runs in (the newest one entered, ``OrderedModuleTracker``); None
        elsewhere."""
        for name in reversed(list(self.tracker.parents) if self.tracker is not None else []):
            m = _SCOPE.search(name)
            if m:
                return int(m.group(1)) if m.group(1) is not None else m.group(2)
        return None

    def _on_device(self, tensors) -> bool:
        return any(t.device.type == self.device.type for t in tensors)

    # ------------------------------------------------------------------------------------------ syncs
    def _sync_kind(self, func, args, kwargs) -> Optional[str]:
        packet = func._overloadpacket
        if packet in SYNC_SCALAR or packet in SYNC_SHAPE:
            return None if (packet is aten.repeat_interleave and kwargs.get("output_size") is not None) \
                else str(packet).split(".")[-1]
        if packet in SYNC_MASK_INDEX:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                return "boolean-mask indexing"
        if packet is aten._to_copy and args[0].device.type != "cpu":
            if torch.device(kwargs.get("device") or args[0].device).type == "cpu":
                return "copy to host"
        if packet is aten.copy_ and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            return "copy to host"
        return None

    def _fake_sync_result(self, func, args, kwargs):
        """A stand-in result on meta (the op cannot compute there): zeros, or all-True masks."""
        packet, x = func._overloadpacket, args[0]
        if packet in SYNC_SCALAR:
            return False if packet is aten.equal or x.dtype == torch.bool else (
                0.0 if x.is_floating_point() else 0)
        if packet is aten.nonzero:
            return torch.zeros((x.numel(), x.dim()), dtype=torch.long, device=x.device)
        if packet is aten.masked_select:
            return torch.empty(torch.broadcast_shapes(x.shape, args[1].shape).numel(), dtype=x.dtype,
                               device=x.device)
        if packet in SYNC_MASK_INDEX:  # every mask element True: a bool index becomes ndim long indices
            indices = []
            for i in args[1]:
                if i is not None and i.dtype in (torch.bool, torch.uint8):
                    indices += [torch.zeros(i.numel(), dtype=torch.long, device=i.device)] * i.dim()
                else:
                    indices.append(i)
            return func(x, indices, *args[2:], **kwargs)
        if packet is aten._to_copy:
            return torch.zeros(x.shape, dtype=kwargs.get("dtype") or x.dtype, device="cpu")
        if packet is aten.copy_:
            return x
        if packet in (aten._unique, aten._unique2, aten.unique_consecutive, aten.unique_dim,
                      aten.unique_dim_consecutive):  # every element distinct
            flat = x.reshape(-1).clone()
            return (flat, torch.zeros(x.shape, dtype=torch.long, device=x.device),
                    torch.ones(flat.shape, dtype=torch.long, device=x.device))[:len(func._schema.returns)]
        raise NotImplementedError(f"the cost model cannot run {func} on meta tensors (a host-device sync)")

    # ------------------------------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        if not self._on_device(inputs) and func._overloadpacket not in (aten._to_copy, aten.copy_):
            return func(*args, **kwargs)  # host work (or a factory: counted below when on the device)
        sync = self._sync_kind(func, args, kwargs) if inputs else None
        if sync is not None:
            self.syncs[(sync, caller())] += 1
            self.totals[(self.phase, None)]["syncs"] += 1
            if self.device.type == "meta":
                return self._fake_sync_result(func, args, kwargs)
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        if not self._on_device(inputs + outputs):
            return out
        self._record(func, args, kwargs, inputs, outputs, out)
        return out

    def _record(self, func, args, kwargs, inputs, outputs, out) -> None:
        packet = func._overloadpacket
        if func.is_view or packet in NOT_KERNELS or packet in SYNC_SCALAR:
            return
        t = self.totals[(self.phase, self._scope())]
        if packet in GEMM or packet in ATTENTION:
            kind = "gemm" if packet in GEMM else "attention"
            t[f"{kind}_flops"] += int(_FLOPS[packet](*args, out_val=out, **kwargs))
            t[f"{kind}_kernels"] += 1
            return
        name = str(packet).split(".", 1)[-1]
        if name.startswith(("_foreach_", "_fused_")):
            lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
            n = multi_tensor_launches(sum(x.numel() for x in lists[0]), len(lists[0])) if lists else 1
        else:
            n = 1
        t["kernels"] += n
        if not outputs:  # in-place multi-tensor ops return nothing: what they write is their mutated arguments
            outputs = _tensors([args[i] for i, a in enumerate(func._schema.arguments[:len(args)])
                                if a.alias_info is not None and a.alias_info.is_write
                                and not _unwritten_grads(name, a.name, kwargs)])
        t["bytes"] += sum(tensor_bytes(x) for x in inputs) + sum(tensor_bytes(x) for x in outputs)
        self.ops[name] += n


# Fused Adam / AdamW mark their grads mutable (``Tensor(b!)[] grads``) because under a GradScaler they unscale them
# in place, but the CUDA kernel stores the grads only when ``grad_scale`` is given (torch's
# ``fused_adam_utils.cuh``, "Conditional Gradient Store"): without it the grads are read, not written.
_FUSED_ADAM = {"_fused_adam_", "_fused_adamw_"}


def _unwritten_grads(op_name: str, arg_name: str, kwargs: dict) -> bool:
    return arg_name == "grads" and op_name in _FUSED_ADAM and kwargs.get("grad_scale") is None


# ----------------------------------------------------------------------------------------------- autocast
_LOW = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
        torch.bmm, torch.Tensor.bmm, torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm,
        torch.einsum, torch.conv1d, torch.conv2d, torch.conv3d, F.scaled_dot_product_attention}
# the ops of CUDA autocast's fp32 list that sfd_scale's step calls (inputs in low precision are upcast)
_FP32 = {torch.pow, torch.Tensor.pow, torch.rsqrt, torch.Tensor.rsqrt, torch.exp, torch.Tensor.exp, torch.log,
         torch.Tensor.log, torch.softmax, torch.Tensor.softmax, F.softmax, F.log_softmax, F.layer_norm,
         F.group_norm, torch.norm, torch.Tensor.norm, F.mse_loss, F.cosine_similarity, F.cross_entropy}


def _cast(tree, dtype):
    return tree_map_only(torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype
                         else t, tree)


def _linear_args(args, kwargs) -> tuple:
    """``F.linear``'s (input, weight, bias) however they were passed."""
    named = dict(zip(("input", "weight", "bias"), args), **kwargs)
    return named["input"], named["weight"], named.get("bias")


class CudaAutocast(TorchFunctionMode):
    """``torch.autocast("cuda", dtype)`` semantics on any tensors (``dtype`` None: no casting), and SDPA run as
    the fused kernel of the target: CUDA flash (half precision) / efficient (fp32) on meta, CPU flash on CPU."""

    def __init__(self, dtype: Optional[torch.dtype]):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and uses_master_weight_path(_linear_args(args, kwargs)[1], self.dtype):
            return master_weight_linear(*_linear_args(args, kwargs), self.dtype)  # what master_linear.linear runs
        if self.dtype is not None and func in _LOW:
            args, kwargs = _cast((args, kwargs), self.dtype)
        elif self.dtype is not None and func in _FP32:
            args, kwargs = _cast((args, kwargs), torch.float32)
        if func is F.scaled_dot_product_attention:
            return _fused_sdpa(*args, **kwargs)
        return func(*args, **kwargs)


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    if attn_mask is not None or dropout_p or kw:
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kw)
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)[0]
    half = q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype and q.shape[-1] <= 256
    if half:
        return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[0]
    return aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, is_causal, scale=scale)[0]

