"""Running megatron-core without CUDA: CPU tensors, gloo process groups (a supported mode, not a test hack).

megatron-core's tensor-parallel layers are written for GPUs, but on CPU their arithmetic and their
collectives (all-reduce, all-gather over gloo) are correct as they are. What stops them are a few places
that name CUDA explicitly. ``enable()`` redirects exactly those, and nothing else:

* ``torch.cuda.current_device()`` returns ``torch.device("cpu")``. Megatron allocates communication
  buffers with ``torch.empty(..., device=torch.cuda.current_device())``; with the CUDA build of torch and
  no GPU that call raises "Found no NVIDIA driver". Call sites this serves for tensor parallelism:
  ``tensor_parallel/mappings.py`` ``_gather_along_last_dim`` (ColumnParallelLinear ``gather_output=True``:
  our adaLN modulations and the final layer) and ``_gather_along_first_dim`` /
  ``_reduce_scatter_along_first_dim`` (sequence parallel, should it be switched on).
* The one-time "set CUDA_DEVICE_MAX_CONNECTIONS=1" warning of
  ``tensor_parallel/layers.py`` ``linear_with_grad_accumulation_and_async_allreduce`` is marked as
  already given: it tunes CUDA stream scheduling, which does not exist on CPU, and would otherwise tell
  every CPU user to set a variable that changes nothing.

Everything else megatron's TP forward/backward does on CPU needs no help: RowParallelLinear's forward
all-reduce and ColumnParallelLinear's backward all-reduce of the input gradient are plain
``torch.distributed`` calls, and weights are built with ``use_cpu_initialization`` (see
``models/lightningdit.parallel_config``), which never touches megatron's CUDA RNG tracker.

Scoped redirections (``megatron_on_cpu()``, a ``TorchFunctionMode`` active only around our calls into
megatron's schedules, DDP and optimizers — never around the model): ``device="cuda"`` factory calls
(pipeline_parallel/schedules.py token counters; optimizer/optimizer.py ``found_inf`` / ``_scale``;
optimizer/clip_grads.py norm buffers) go to the CPU, ``Tensor.cuda()`` is the identity, and
``Tensor.type()`` reports the CUDA type name that optimizer.py / distrib_optimizer.py / clip_grads.py
assert on. ``torch.cuda.synchronize`` (pipeline p2p after batched ops) is a no-op process-wide.
Not patched because nothing here needs it: the CUDA RNG tracker / ``model_parallel_cuda_manual_seed``
(GPU-side init and megatron dropout; we initialise on the CPU and use no dropout).

``enable()`` is idempotent and is applied by ``sfd_scale.parallel.layout.initialize`` only when
``torch.cuda.is_available()`` is False, so a GPU run is never altered. The redirection is process-wide
(megatron looks ``torch.cuda.current_device`` up at call time, so it cannot be scoped to megatron);
on a machine without a GPU that call could only have raised before.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_CPU = torch.device("cpu")


def _current_device() -> torch.device:
    """Stand-in for ``torch.cuda.current_device``: a device usable as ``device=`` in factory calls."""
    return _CPU


def enable() -> None:
    """Apply the CPU redirections (once; later calls do nothing). Refuses to run where CUDA works."""
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("sfd_scale.parallel.cpu_compat.enable() is for machines without a GPU; "
                           "CUDA is available here")
    # megatron/core/tensor_parallel/mappings.py (_gather_along_last_dim & co), utils.py
    # GlobalMemoryBuffer, layers.py grad buffers: torch.empty(..., device=torch.cuda.current_device())
    torch.cuda.current_device = _current_device
    # megatron/core/pipeline_parallel/p2p_communication.py: torch.cuda.synchronize() after batched p2p
    # (a workaround for an NCCL race); gloo's send / recv complete synchronously on CPU
    torch.cuda.synchronize = lambda device=None: None
    # megatron/core/tensor_parallel/layers.py linear_with_grad_accumulation_and_async_allreduce: CUDA
    # stream advice (CUDA_DEVICE_MAX_CONNECTIONS) that is meaningless without CUDA
    from megatron.core.tensor_parallel import layers as mcore_layers

    mcore_layers.linear_with_grad_accumulation_and_async_allreduce.warned = True
    _ENABLED = True


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a bare int is a CUDA ordinal


class _CudaToCpu(TorchFunctionMode):
    """Rewrites megatron's hard-coded CUDA tensor creation and type checks (call sites: module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


@contextlib.contextmanager
def megatron_on_cpu():
    """Scope for calls into megatron schedules / DDP / optimizers; does nothing when CUDA is available."""
    if torch.cuda.is_available():
        yield
        return
    enable()
    with _CudaToCpu():
        yield
