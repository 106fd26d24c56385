"""Checkpoint conversion between the official release, sfd_scale's native checkpoints, single files and
DeepSpeed ZeRO checkpoints (``sfd convert`` is the command).

Native checkpoints (``train/state.py``, ``checkpoint_store.py``) hold every tensor in full under its official name, so
one native checkpoint serves every TP / PP / DP layout: a run on any layout resumes from it and shards while
loading. There is therefore no per-layout native format to reshard offline; ``tests/dist/`` checks that
loading with resharding equals the layout's own weights.

Memory: each conversion holds at most one copy of the weights it converts (official ``.pt`` files are
memory-mapped where their format allows, dtype changes happen tensor by tensor), plus the EMA when both
are written. Each conversion calls ``stage(what)`` as it starts each of its steps (read, check, write), so a
command can show where a conversion of a large model is (``STAGES`` counts them).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from .. import checkpoint_store as store
from ..atomic import atomic_path
from ..config import Config, model_args, require_package
from ..models.lightningdit import LightningDiT
from ..errors import MissingInputError
from ..models.official import check_fits, read_checkpoint
from .state import native_state

StateDict = Dict[str, torch.Tensor]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Stage = Callable[[str], None]
# how many times each conversion calls ``stage``
STAGES = {"official-to-native": 4, "deepspeed-to-native": 3, "native-to-official": 3, "native-to-safetensors": 2}


def _quiet(what: str) -> None:
    pass


def expected_shapes(cfg: Config) -> StateDict:
    """The full (TP = 1) state dict of the configured model, as meta tensors: shapes without memory."""
    from ..parallel.layout import ensure_initialized

    ensure_initialized()
    with torch.device("meta"):
        model = LightningDiT(model_args(cfg))
    return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}


def check_against_config(sd: StateDict, cfg: Config, what: str) -> None:
    try:
        check_fits(expected_shapes(cfg), sd)
    except ValueError as err:
        raise ValueError(f"{what} does not fit model {cfg.model.name} of the config "
                         f"(model.* settings): {err}") from None


def write_native(out_dir: str | os.PathLike, cfg: Config, model: StateDict, ema: StateDict, step: int = 0,
                 source: str = "", stage: Stage = _quiet) -> Path:
    """A native checkpoint (run directory ``out_dir``, as ``train.output_dir``) with these weights and no
    optimizer state: a run resumes from it at ``step`` with a fresh optimizer, on any layout."""
    stage("checking the weights against the config")
    check_against_config(model, cfg, "the model weights")
    check_against_config(ema, cfg, "the EMA weights")
    stage(f"writing the native checkpoint into {out_dir}")
    layout = {"converted_from": source}
    state, info = native_state(cfg, model, ema, step, layout)
    saver = store.Checkpointer(out_dir, keep_last=1 << 30, asynchronous=False)
    return saver.save(step, state, {"layout": layout, "code": info["code"]})


def official_to_native(src: str | os.PathLike, cfg: Config, out_dir: str | os.PathLike, step: int = 0,
                       stage: Stage = _quiet) -> Path:
    """An official ``train.py`` container (``model`` + ``ema``), a bare state dict or a ``.safetensors``
    file (taken as both model and EMA) -> a native checkpoint."""
    stage(f"reading the EMA weights of {src}")
    ema = read_checkpoint(src, which="ema")
    stage(f"reading the model weights of {src}")
    try:
        model = read_checkpoint(src, which="model")
    except KeyError:  # a container with an 'ema' entry only
        model = ema
    return write_native(out_dir, cfg, model, ema, step, source=f"official {src}", stage=stage)


def native_weights(directory: str | os.PathLike, which: str, dtype: Optional[str] = None) -> StateDict:
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    sd = store.read_weights(directory, which)
    if dtype is not None:
        for k in list(sd):  # one tensor at a time: no second full copy
            sd[k] = sd[k].to(DTYPES[dtype])
    return sd


def native_to_official(directory: str | os.PathLike, out: str | os.PathLike, stage: Stage = _quiet) -> Path:
    """The official container: ``model`` and ``ema`` under the official key names, what the official
    ``inference.py`` loads (it takes ``ema``). Written aside and renamed."""
    out = Path(out)
    stage(f"reading the model weights of {directory}")
    state = {"model": native_weights(directory, "model")}
    stage(f"reading the EMA weights of {directory}")
    state["ema"] = native_weights(directory, "ema")
    stage(f"writing {out}")
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    return out


def native_to_safetensors(directory: str | os.PathLike, out: str | os.PathLike, which: str = "ema",
                          dtype: str = "fp32", stage: Stage = _quiet) -> Path:
    """One consolidated ``.safetensors`` file of the EMA or raw weights in the chosen dtype."""
    from safetensors.torch import save_file

    out = Path(out)
    stage(f"reading the {which} weights of {directory}")
    sd = native_weights(directory, which, dtype)
    stage(f"writing {out}")
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp),
                  metadata={"format": "pt", "source": str(directory), "weights": which, "dtype": dtype})
    return out


def deepspeed_to_native(ds_dir: str | os.PathLike, cfg: Config, out_dir: str | os.PathLike,
                        tag: Optional[str] = None, step: int = 0, stage: Stage = _quiet) -> Path:
    """A DeepSpeed checkpoint (``engine.save_checkpoint``; any ZeRO stage) of an sfd_scale model -> native.
    DeepSpeed's own ``zero_to_fp32`` assembles the fp32 weights from the partitions (frozen tensors and
    buffers included); a DeepSpeed checkpoint has no EMA, so the EMA starts as a copy of the weights."""
    require_package("deepspeed", "converting a DeepSpeed checkpoint needs DeepSpeed: "
                                 "pip install 'sfd_scale[deepspeed]'")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not Path(ds_dir).is_dir():
        raise MissingInputError(f"DeepSpeed checkpoint directory not found: {ds_dir}")
    stage(f"assembling the fp32 weights of {ds_dir} (zero_to_fp32)")
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    return write_native(out_dir, cfg, sd, {k: v.clone() for k, v in sd.items()}, step,
                        source=f"deepspeed {ds_dir}", stage=stage)
