"""Official SFD / LightningDiT checkpoints <-> our model.

* ``args_from_official(**kwargs)``: the official ``LightningDiT(...)`` constructor arguments -> ``ModelArgs``
  (plus ``sfd_spec_from_official`` for the channel split and dt); ``official_kwargs(args, spec)`` the way
  back (the benchmark builds the official model of the same size from it).
* ``build_official(**kwargs)``: a ready model from those arguments.
* ``read_checkpoint(path, which='ema')``: an official container (``.pt`` from train.py with
  ``model``/``ema``/``opt``/``config``, a bare state dict, or ``.safetensors``) -> official state dict.
* ``load_official_state_dict(model, sd)`` / ``export_official_state_dict(model)``.

At TP=1 the native names *are* the official names (plus megatron's ``_extra_state`` placeholders);
the only translation is the ``module.`` prefix that DDP / accelerate leave on train.py's ``model`` entry.
At TP > 1 (read from the model's megatron layers) the same names hold local shards: loading slices the
full official tensors for this rank and exporting all-gathers them back (``tensor_parallel.py``).
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch

from ..checkpoint_store import CheckpointError
from ..diffusion.sfd import SFDSpec
from ..errors import MissingInputError, one_line
from .lightningdit import REPA_FEATURE_DIMS, LightningDiT, ModelArgs, parallel_config
from .tensor_parallel import gather_state_dict, model_tp, shard_state_dict

StateDict = Dict[str, torch.Tensor]

# official constructor keyword -> our ModelArgs field (identity unless listed)
_DIRECT = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
           "class_dropout_prob", "num_classes", "learn_sigma", "use_qknorm", "use_swiglu", "use_rope",
           "use_rmsnorm", "wo_shift", "use_repa", "repa_depth", "repa_projector_dim")
_IGNORED = ("use_checkpoint", "semfirst_infer_interval_mode", "semantic_chans", "semfirst_delta_t",
            "repa_dino_version")
# the official constructor's defaults for switches it does not require
_OFFICIAL_DEFAULTS = dict(input_size=32, patch_size=2, in_channels=32, hidden_size=1152, depth=28, num_heads=16,
                          mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=False,
                          use_qknorm=False, use_swiglu=False, use_rope=False, use_rmsnorm=False, wo_shift=False,
                          use_repa=False, repa_depth=2, repa_projector_dim=2048, semantic_chans=0,
                          semfirst_delta_t=0.0, repa_dino_version=None, semfirst_infer_interval_mode="both")


def repa_feature_dim(version: Optional[str]) -> int:
    if version is None:
        return 768
    base = version.replace("_reg", "")
    if base not in REPA_FEATURE_DIMS:
        raise ValueError(f"unknown repa_dino_version {version!r}; known: {sorted(REPA_FEATURE_DIMS)} (+ '_reg')")
    return REPA_FEATURE_DIMS[base]


def sfd_spec_from_official(**kwargs) -> SFDSpec:
    """Channel split, dt and guidance interval mode of an official model: texture = in_channels -
    semantic_chans."""
    kw = {**_OFFICIAL_DEFAULTS, **kwargs}
    sem = int(kw["semantic_chans"] or 0)
    if not 0 <= sem < kw["in_channels"]:
        raise ValueError(f"channel split does not add up: semantic_chans={sem} with in_channels={kw['in_channels']}")
    return SFDSpec(texture_chans=kw["in_channels"] - sem, semantic_chans=sem,
                   delta_t=float(kw["semfirst_delta_t"] or 0.0) if sem else 0.0,
                   interval_mode=kw["semfirst_infer_interval_mode"])


def args_from_official(**kwargs) -> ModelArgs:
    unknown = set(kwargs) - set(_DIRECT) - set(_IGNORED)
    if unknown:
        raise TypeError(f"unknown official LightningDiT argument(s): {sorted(unknown)}")
    kw = {**_OFFICIAL_DEFAULTS, **kwargs}
    spec = sfd_spec_from_official(**kwargs)
    return ModelArgs(**{k: kw[k] for k in _DIRECT}, dual_time_embed=spec.is_async,
                     repa_feature_dim=repa_feature_dim(kw["repa_dino_version"]))


def official_kwargs(args: ModelArgs, spec: SFDSpec, use_checkpoint: bool = False) -> dict:
    """The official ``LightningDiT(...)`` constructor arguments of our ``args`` + ``spec`` (the inverse of
    ``args_from_official``); ``use_checkpoint`` is the official activation checkpointing switch."""
    if args.dual_time_embed != spec.is_async:
        raise ValueError(f"dual_time_embed={args.dual_time_embed} does not match the SFD spec {spec} (the official "
                         "model has separate time embedders exactly when semantic_chans > 0 and delta_t > 0)")
    if args.in_channels != spec.channels:
        raise ValueError(f"in_channels={args.in_channels} but the SFD spec has {spec.channels} channels")
    kwargs = {k: getattr(args, k) for k in _DIRECT}
    kwargs.update(semantic_chans=spec.semantic_chans, semfirst_delta_t=spec.delta_t, use_checkpoint=use_checkpoint,
                  repa_dino_version=None, semfirst_infer_interval_mode=spec.interval_mode)
    if args.use_repa:
        versions = [v for v, dim in REPA_FEATURE_DIMS.items() if dim == args.repa_feature_dim]
        if not versions:
            raise ValueError(f"repa_feature_dim={args.repa_feature_dim} matches no DINOv2 width {REPA_FEATURE_DIMS}")
        kwargs["repa_dino_version"] = versions[0]
    return kwargs


def build_official(*, tensor_parallel: int = 1, **kwargs) -> LightningDiT:
    """Our model, built from the official constructor arguments (for a ``tensor_parallel``-way layout, which
    the caller has set up)."""
    return LightningDiT(args_from_official(**kwargs), parallel_config(tensor_parallel=tensor_parallel))


# ----------------------------------------------------------------------------------------------- reading
def _is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str = "module.") -> StateDict:
    """Remove a leading ``module.`` (possibly repeated: DDP inside accelerate) from every key."""
    out = {}
    for k, v in sd.items():
        while k.startswith(prefix):
            k = k[len(prefix):]
        out[k] = v
    return out


def _torch_load(path: Path):
    """torch.load that survives torch >= 2.6's weights_only default on train.py checkpoints.

    train.py pickles its OmegaConf config next to the weights; with weights_only=True that entry cannot
    be unpickled. We never unpickle arbitrary objects: we load with weights_only=True and, if only
    OmegaConf types are in the way, allow exactly those (omegaconf's containers are plain data).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "omegaconf" not in str(err) and not zipfile.is_zipfile(path):
            # not torch.save's zip container: weights_only reports garbage bytes with the same error type
            # as a forbidden class, so name it for what it almost surely is (still refused either way)
            raise CheckpointError(f"unreadable checkpoint {path}: neither a torch.save zip archive nor a loadable "
                                  "legacy torch file") from err
        if "omegaconf" not in str(err):
            raise CheckpointError(f"cannot safely read checkpoint {path}: {err}. It holds pickled objects other "
                                  "than tensors and OmegaConf configs; convert it to safetensors with a trusted "
                                  "torch.load") from err
    import omegaconf
    from omegaconf import base, dictconfig, listconfig, nodes

    safe = [omegaconf.DictConfig, omegaconf.ListConfig, dictconfig.DictConfig, listconfig.ListConfig,
            base.ContainerMetadata, base.Metadata, nodes.AnyNode, nodes.StringNode, nodes.IntegerNode,
            nodes.FloatNode, nodes.BooleanNode, nodes.ValueNode, nodes.EnumNode, nodes.PathNode,
            nodes.BytesNode]
    import collections
    import typing
    safe += [collections.defaultdict, dict, list, int, float, str, bool, type(None), typing.Any]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"cannot safely read checkpoint {path}: {err}") from err


def read_checkpoint(path: Union[str, os.PathLike], which: str = "ema") -> StateDict:
    """Official state dict from a checkpoint file.

    ``which`` picks the entry of a train.py container ('ema' as inference.py does, or 'model');
    a file that is directly a state dict is returned as is. ``module.`` prefixes are removed. An
    sfd_scale checkpoint directory (``checkpoint_store.py``) gives its full weights.
    """
    path = Path(path)
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    if path.is_dir() and (path / "manifest.json").is_file():  # an sfd_scale checkpoint directory
        from ..checkpoint_store import read_weights

        return read_weights(path, which)
    if not path.is_file():
        raise MissingInputError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(str(path))
        else:
            obj = _torch_load(path)
    except (ValueError, FileNotFoundError):  # ours, naming the file
        raise
    except Exception as err:  # corrupt zip / pickle / safetensors header: each library has its own error type
        raise CheckpointError(f"unreadable checkpoint {path}: not a torch.save archive, legacy torch file or "
                              f"safetensors file ({type(err).__name__}: {one_line(err)}); give an official .pt / "
                              f".safetensors or an sfd_scale checkpoint directory") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict or container")
    selected = which in obj and isinstance(obj[which], Mapping)
    if selected:
        obj = obj[which]
    elif any(k in obj for k in ("ema", "model")):
        raise KeyError(f"checkpoint {path} has no {which!r} entry (entries: {sorted(obj)})")
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        # a container holding neither entry must say so, not only that it is no state dict
        what = f"its {which!r} entry" if selected else f"it has no {which!r} entry and"
        raise ValueError(f"checkpoint {path}: {what} is not a state dict (entries {bad[:5]} are not tensors)")
    return strip_prefix(obj)


# ----------------------------------------------------------------------------------------------- mapping
def load_official_state_dict(model: LightningDiT, sd: Mapping[str, torch.Tensor]) -> None:
    """Strictly load a full official state dict into ``model``. One clear error on any mismatch.

    Under TP every rank of the group passes the same full state dict and keeps its own shard.
    """
    sd = strip_prefix(sd)
    tp_rank, tp_size, _ = model_tp(model)
    if tp_size > 1:
        sd = shard_state_dict(sd, model.args, tp_rank, tp_size)
    own = {k: v for k, v in model.state_dict().items() if not _is_extra_state(k)}
    check_fits(own, sd)
    model.load_state_dict({k: sd[k] for k in own}, strict=False)


def check_fits(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]) -> None:
    """ValueError listing missing / unexpected keys and shape mismatches of ``sd`` against ``own``."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(k for k in set(sd) - set(own) if not _is_extra_state(k))
    wrong = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in set(own) & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if wrong:
            parts.append(f"shape mismatches {wrong[:4]}")
        raise ValueError("state dict does not fit the model: " + "; ".join(parts))


def export_official_state_dict(model: LightningDiT, copy: bool = True) -> StateDict:
    """Our weights under the official key names (what the official LightningDiT.load_state_dict takes).

    Under TP this is a collective over the model's TP group: every rank gets the full tensors (new ones).
    ``copy=False`` at TP = 1 returns the live (detached) tensors themselves, for a caller that copies them
    at once anyway (a checkpoint save stages them into host memory): no device-side copy.
    """
    _, tp_size, group = model_tp(model)
    if tp_size > 1:
        local = {k: v for k, v in model.state_dict().items() if not _is_extra_state(k)}
        return gather_state_dict(local, model.args, group=group)
    return {k: v.detach().clone() if copy else v.detach() for k, v in model.state_dict().items()
            if not _is_extra_state(k)}
