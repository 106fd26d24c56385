"""The training state and its checkpoint key layout: the one place that says what a checkpoint holds.

``sfd_scale/checkpoint_store.py`` writes and reads a checkpoint directory (DCP, manifest, verify, prune); this
module decides its contents. Keys are layout-free, so a run on any TP x PP x DP and any engine resumes from any
checkpoint:

  ``model/<official key>``, ``ema/<official key>``   full tensors under the official LightningDiT names
                                                     (``pipeline.global_key``: block numbers of the whole model);
  ``optim/<kind>/<official key>``                    Adam ``exp_avg`` / ``exp_avg_sq`` (+ fp32 ``master``
                                                     with bf16 weights), one full tensor per parameter;
  ``counters``                                       optimizer steps, LR schedule, engine counters;
  ``trainer``                                        step, data position, skipped steps, the metrics of the
                                                     steps since the last log step, layout, code version;
  ``config``                                         the resolved config (a plain dict);
  ``latent_stats``                                   the data's latent normalisation (``data.decoding.LatentStats``
                                                     as a dict; shards / official data): sampling decodes with it,
                                                     without the dataset;
  ``rng/rank_00000`` ...                             every rank's torch / numpy / python RNG states
                                                     (objects are stored packed: ``checkpoint_store.pack``).

Every rank passes the tensors it holds: a TP group's ranks hold them gathered (the export gathers weights,
``collect`` gathers optimizer state), pipeline stages their own blocks, DP replicas the same (the engine
gathers what it shards). Loading reads the keys this rank's chunks need and shards them over TP here, over DP
in the engine. ``native_state`` is the weights-only form ``train/convert.py`` writes.
"""
from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from ..data.decoding import LATENT_STATS
from ..models.official import export_official_state_dict, load_official_state_dict
from ..models.tensor_parallel import gather_state_dict, model_tp, shard_state_dict
from ..parallel.engines.base import ADAM_KINDS
from ..parallel.pipeline import global_key, stage_state_dict
from .. import checkpoint_store as store

State = Dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------- keys and objects
def weights_key(which: str, name: str) -> str:
    """``which``: 'model' or 'ema'; ``name``: an official (whole-model) key."""
    return f"{which}/{name}"


def optim_key(kind: str, name: str) -> str:
    return f"optim/{kind}/{name}"


def rng_key(rank: int) -> str:
    return f"rng/rank_{rank:05d}"


def run_info(cfg, step: int, layout: dict, nonfinite_steps: int = 0, code: Optional[dict] = None,
             log_window: Optional[List[dict]] = None) -> dict:
    """The ``trainer`` object of a checkpoint. Batch k is a pure function of (seed, k) (data/sources.py),
    so the data position is the step; seed and global batch size must match to continue. ``log_window``: the
    step records read since the last log step (``step_io.StepWindow.state``), which the next log line averages."""
    return {"step": step, "nonfinite_steps": nonfinite_steps, "seed": cfg.train.seed,
            "global_batch_size": cfg.train.global_batch_size,
            "data_position": {"global_batches": step, "samples": step * cfg.train.global_batch_size},
            "log_window": list(log_window or []),
            "layout": layout, "code": code if code is not None else store.code_version()}


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def with_prefix(state: dict, prefix: str) -> dict:
    """The entries of ``state`` under ``prefix``, the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def chunk_part(full: dict, chunk, pipelined: bool) -> dict:
    """The part of a full state dict a model chunk holds: its pipeline stage's (block indices made local), or
    all of it (checked strictly by the loader) without pipeline stages."""
    return stage_state_dict(full, chunk) if pipelined else full


def native_state(cfg, model: State, ema: State, step: int, layout: dict) -> Tuple[State, dict]:
    """(state, run info) of a checkpoint with these full weights and no optimizer state (a run resumes from it
    at ``step`` with a fresh optimizer, on any layout)."""
    state = {weights_key("model", k): v for k, v in model.items()}
    state.update({weights_key("ema", k): v for k, v in ema.items()})
    info = run_info(cfg, step, layout)
    state.update(counters=store.pack({"optimizer_steps": 0}), trainer=store.pack(info), config=store.pack(asdict(cfg)))
    return state, info


def choose_checkpoint(output_dir: Path, rank: int, start_fresh_over_unusable: bool = False
                      ) -> Tuple[Optional[Path], List[str]]:
    """Collective: rank 0 removes unfinished saves and verifies the checkpoints newest first; every rank gets
    (the checkpoint to resume from or None, rank 0's notes on what it removed or passed over). When
    ``checkpoints/`` holds ``step_*`` entries but none can be resumed from, every rank raises ``CheckpointError``
    listing them, unless ``start_fresh_over_unusable`` (then: None, the entries left in place)."""
    found = [None, [], None]
    if rank == 0:
        notes = [f"removed the unfinished checkpoint save {p}" for p in store.remove_unfinished(output_dir)]
        path, passed = store.newest_verified(output_dir)
        notes += [f"skipping checkpoint {entry}: {problem}" for entry, problem in passed]
        refusal = None
        if path is None and passed:
            if start_fresh_over_unusable:
                notes.append(f"starting from scratch over {len(passed)} unusable checkpoint entries "
                             "(checkpoint.start_fresh_over_unusable=true); they are left in place")
            else:
                refusal = unusable_checkpoints_message(Path(output_dir) / "checkpoints", passed)
        found = [None if path is None else str(path), notes, refusal]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(found, src=0)
    if found[2] is not None:
        raise store.CheckpointError(found[2])
    return (None if found[0] is None else Path(found[0])), found[1]


def unusable_checkpoints_message(root: Path, passed: list) -> str:
    """One line: what is wrong with each entry, and the two ways on."""
    listed = "; ".join(f"{entry.name}: {problem}" for entry, problem in passed)
    return (f"checkpoint.resume: {root} holds {len(passed)} checkpoint entries and none can be resumed from "
            f"({listed}); refusing to start from scratch over them (nothing was changed): repair or move them away, "
            f"or set checkpoint.start_fresh_over_unusable=true to start from step 0 and leave them in place")


class TrainingState:
    """What one rank contributes to, and takes from, a checkpoint: its model chunks (one, or its pipeline
    chunks), their EMA (``train/ema.py``: whole, or sharded over DP and gathered here), the engine's optimizer
    state and counters, and its RNG states. Under ZeRO-3 the weights are gathered from their partitions to be
    saved, and loaded into every rank's partition (``engine.full_parameters``)."""

    def __init__(self, chunks: list, ema, engine, pipelined: bool):
        self.chunks, self.ema, self.engine, self.pipelined = chunks, ema, engine, pipelined

    # ------------------------------------------------------------------------------------------ weights
    @staticmethod
    def stage_weights(chunks, copy: bool = True) -> State:
        """These chunks' weights, full over TP (the export gathers), under official global names;
        ``copy=False``: the live tensors where there is nothing to gather (a save stages them itself)."""
        return {global_key(chunk, k): v for chunk in chunks
                for k, v in export_official_state_dict(chunk, copy=copy).items()}

    def _model_weights(self, copy: bool) -> State:
        """This rank's chunks' weights (``stage_weights``); gathered copies under ZeRO-3 whatever ``copy``."""
        with self.engine.full_parameters():
            return self.stage_weights(self.chunks, copy=copy or self.engine.partitions_weights)

    def _ema_weights(self, copy: bool) -> State:
        """Collective with a sharded EMA: the EMA's chunks' full weights (``stage_weights``; a sharded EMA's
        are the tensors of its gathered copy, made for this call, whatever ``copy``)."""
        with self.ema.full_chunks() as ema_chunks:
            return self.stage_weights(ema_chunks, copy=copy and not self.ema.sharded)

    def full_weights(self, which: str = "model") -> State:
        """Official-named full weights ('model' or 'ema') on every rank: gathered over TP by the export, over
        pipeline stages here (collective; for tests and tools, checkpoints do not need it)."""
        local = self._model_weights(copy=True) if which == "model" else self._ema_weights(copy=True)
        if not self.pipelined:
            return local
        parts = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(parts, local, group=parallel_state.get_pipeline_model_parallel_group())
        return {k: v for part in parts for k, v in part.items()}

    # ------------------------------------------------------------------------------------------ save
    def collect(self, cfg, rank: int, info: dict, latent_stats: Optional[dict] = None) -> State:
        """Collective (TP gathers of optimizer state, DP gathers in the engine): every tensor this rank
        contributes, under its checkpoint key; rank 0 adds the run's objects (``info``: ``run_info``;
        ``latent_stats``: the data's ``LatentStats.to_object()``, where it has one)."""
        state: State = {weights_key("model", k): v for k, v in self._model_weights(copy=False).items()}
        state.update({weights_key("ema", k): v for k, v in self._ema_weights(copy=False).items()})
        engine_state = self.engine.state_dict()
        for chunk, params in zip(self.chunks, engine_state["params"], strict=True):
            _, tp_size, group = model_tp(chunk)
            for kind in sorted({k for kinds in params.values() for k in kinds}):
                local = {name: kinds[kind] for name, kinds in params.items()}
                full = gather_state_dict(local, chunk.args, group=group) if tp_size > 1 else local
                state.update({optim_key(kind, global_key(chunk, name)): t for name, t in full.items()})
        state[rng_key(rank)] = store.pack(rng_state())
        if rank == 0:
            state["counters"] = store.pack(engine_state["counters"])
            state["trainer"] = store.pack(info)
            state["config"] = store.pack(asdict(cfg))
            if latent_stats is not None:
                state[LATENT_STATS] = store.pack(latent_stats)
        return state

    # ------------------------------------------------------------------------------------------ load
    def read(self, directory: Path, rank: int, group=None) -> Tuple[State, List[str], dict]:
        """Collective: the stored entries this rank needs, read from ``directory``, the optimizer state kinds
        it holds and the stored run info (``trainer``). Raises ``CheckpointError`` naming the directory when
        it is not this format or does not fit the model."""
        fmt = store.manifest(directory).get("format")
        if fmt != store.FORMAT:
            raise store.CheckpointError(f"checkpoint {directory} has format {fmt!r}, this sfd_scale reads "
                                       f"{store.FORMAT!r} (written by an older version): start a new "
                                       f"train.output_dir, or take its weights with checkpoint.init_from")
        meta = store.stored_keys(directory)
        keys = ["counters", "trainer"] + ([rng_key(rank)] if rng_key(rank) in meta else [])
        kinds = [k for k in ADAM_KINDS + ("master",) if any(key.startswith(optim_key(k, "")) for key in meta)]
        for chunk in self.chunks:
            names = [k for k in chunk.state_dict() if not k.endswith("_extra_state")]
            keys += [weights_key(which, global_key(chunk, k)) for which in ("model", "ema") for k in names]
            keys += [optim_key(kind, global_key(chunk, n)) for kind in kinds
                     for n, p in chunk.named_parameters() if p.requires_grad]
        try:
            state = store.empty_like_stored(directory, keys, meta)
        except store.CheckpointError as err:
            raise store.CheckpointError(f"{err}: it does not fit this model (model.* settings changed?)") from None
        store.load(directory, state, group)
        return state, kinds, store.unpack(state["trainer"])

    def restore(self, state: State, kinds: List[str], rank: int) -> None:
        """Put ``read``'s entries into the chunks, their EMA, the engine (sharded over TP here, over DP by the
        engine) and this rank's RNGs."""
        model, ema = with_prefix(state, weights_key("model", "")), with_prefix(state, weights_key("ema", ""))
        optim = {kind: with_prefix(state, optim_key(kind, "")) for kind in kinds}
        params = []
        with self.engine.full_parameters(modify=True):  # ZeRO-3: every rank's partition of the loaded weights
            for chunk in self.chunks:
                load_official_state_dict(chunk, chunk_part(model, chunk, self.pipelined))
        with self.ema.loading_chunks() as ema_chunks:
            for chunk, ema_chunk in zip(self.chunks, ema_chunks, strict=True):
                load_official_state_dict(ema_chunk, chunk_part(ema, chunk, self.pipelined))
        for chunk in self.chunks:
            tp_rank, tp_size, _ = model_tp(chunk)
            per: Dict[str, dict] = {}
            for kind in kinds:
                full = chunk_part(optim[kind], chunk, self.pipelined)
                local = shard_state_dict(full, chunk.args, tp_rank, tp_size) if tp_size > 1 else full
                for name, t in local.items():
                    per.setdefault(name, {})[kind] = t
            params.append(per)
        self.engine.load_state_dict({"params": params, "counters": store.unpack(state["counters"])})
        if rng_key(rank) in state:
            set_rng_state(store.unpack(state[rng_key(rank)]))
