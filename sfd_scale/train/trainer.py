"""The one training loop: batch -> SFD objective -> engine step -> EMA -> log -> samples -> checkpoint.

One loop for every engine (plain / megatron DDP / DeepSpeed ZeRO) and layout (TP x DP); the engine
behind ``parallel/engines/`` differs, this file does not. Global batch k is a pure function of
(train.seed, k) (``data/sources.py``) and every random draw of step k (base time, noise, label dropout)
is keyed by (train.seed, k, sample index): a resumed run repeats exactly what an uninterrupted one would
have done, and DP = 2 trains on exactly what DP = 1 trains on, whichever rank reads which sample.

No host sync between log steps: the draws are made on the device (``diffusion/keyed_noise.py``), the next
batch is copied on a side stream (``step_io.DevicePrefetcher``), the engines return device tensors and skip
a non-finite step on the device, the EMA folds the skip into its weight, and the metrics of a window of
steps are read once (``step_io.StepWindow``) at each ``train.log_every`` step, checkpoint and at the end.
A non-finite step is therefore reported (log.txt names it) and counted against
``train.max_nonfinite_steps`` at the next such read, up to ``log_every - 1`` steps later; reaching the limit
still saves a checkpoint and stops with an error. Stop requests (signals, time budget) are agreed between
ranks every ``train.stop_check_every`` steps and at every checkpoint step (one process: every step).
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from megatron.core import parallel_state

from ..config import Config, ConfigError, model_args, objective_config, sfd_spec, to_yaml
from ..data.sources import Placement, build_training_data
from ..diffusion.micro_batch import MicroBatch, TrainingDraws
from ..diffusion.sfd import SFDObjective
from ..eval.generate import save_sample_grid
from ..logging import RunLogger
from ..models.layers import attention_backend
from ..models.lightningdit import LightningDiT, count_parameters
from ..models.official import export_official_state_dict, load_official_state_dict, read_checkpoint
from ..parallel.engines import build_engine
from ..parallel.engines.base import ADAM_KINDS, local_micro_batches
from ..parallel.layout import ParallelLayout, initialize
from ..parallel.optimizations import apply_activation_checkpointing, apply_compile, compile_enabled, compiled_modules
from ..parallel.pipeline import build_stages, global_key, stage_state_dict
from ..parallel.tensor_parallel import gather_state_dict, model_tp, shard_state_dict
from . import checkpoint as ckpt
from .ema import EMA
from .step_io import DevicePrefetcher, StepWindow, log_line


REQUEUE_EXIT = 75  # EX_TEMPFAIL ("try again later"): checkpoint written on a signal or at the time budget;
                   # slurm/common.sh requeues the job when the training step exits with it


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but no GPU is available")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


class Trainer:
    def __init__(self, cfg: Config, device: Optional[torch.device] = None):
        """``device`` overrides ``train.device``: the cost model (``train/cost_model.py``) passes
        ``torch.device("meta")`` to count a step of a model too big to materialise."""
        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)
        # first: under srun this sets RANK / LOCAL_RANK from SLURM's variables, which the device needs
        initialize(ParallelLayout(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                                  cfg.parallel.virtual_stages))
        self.device = torch.device(device) if device is not None else _device(cfg.train.device)
        self.pipelined = cfg.parallel.pipeline_parallel > 1
        self.rank = dist.get_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        if cfg.parallel.engine == "deepspeed" and cfg.parallel.zero_stage == 3:
            raise ConfigError("parallel.zero_stage=3 is not supported by the trainer yet: its EMA follows the "
                              "module's parameters, which ZeRO-3 partitions (use stage 1 or 2)")
        torch.manual_seed(cfg.train.seed)  # model initialisation: identical on every rank

        self.spec = sfd_spec(cfg)
        self.data = build_training_data(cfg)
        self.spec.check_channels(self.data.channels, f"the data's latent channels ({cfg.data.source})")
        if self.data.num_classes is not None and self.data.num_classes > cfg.model.num_classes:
            raise ValueError(f"model.num_classes ({cfg.model.num_classes}) is smaller than the data's "
                             f"{self.data.num_classes} classes")
        if cfg.model.use_repa and not self.data.has_repa_features:
            raise ValueError(f"model.use_repa is on but the training data has no REPA target features "
                             f"(feats_dino in the shards): {self.data.description}")

        # this rank's model: the whole LightningDiT, or its pipeline chunks (one per virtual stage)
        # on meta the weights are never allocated (megatron's CPU initialisation runs on meta tensors)
        with torch.device("meta") if self.device.type == "meta" else contextlib.nullcontext():
            chunks = (build_stages(model_args(cfg)) if self.pipelined else [LightningDiT(model_args(cfg))])
        chunks = [c.to(self.device) for c in chunks]
        if cfg.checkpoint.init_from:
            full = read_checkpoint(cfg.checkpoint.init_from, which="ema")
            for chunk in chunks:
                load_official_state_dict(chunk, self._part(full, chunk))
        # Label dropout is drawn with the step's other draws (``self.draws``), not inside the model from a
        # per-rank RNG, so that every layout drops the same labels.
        for chunk in chunks:
            if chunk.stage.pre_process:
                chunk.y_embedder.dropout_prob = 0.0
        self.engine = build_engine(chunks if self.pipelined else chunks[0], cfg)
        self.chunks = chunks
        self.model = nn.ModuleList(chunks) if self.pipelined else chunks[0]
        self.ema = EMA(self.model, cfg.train.ema_decay)
        apply_activation_checkpointing(chunks, cfg.train.activation_checkpointing)
        self.compiled = compile_enabled(cfg.train.compile, self.device)
        if self.compiled:  # after the EMA copy: it stays eager
            apply_compile(chunks)
        self.objective = SFDObjective(self.spec, objective_config(cfg))
        self.draws = TrainingDraws(cfg.train.seed, lognorm=self.objective.config.use_lognorm,
                                   label_dropout=cfg.model.class_dropout_prob, null_label=cfg.model.num_classes)
        self.step, self.nonfinite_steps, self.notes = 0, 0, []
        self.code = ckpt.code_version()  # once: the run log and every checkpoint
        c = cfg.checkpoint
        self.checkpointer = ckpt.Checkpointer(self.out, c.keep_last, c.keep_every, c.asynchronous)
        # stop requests (signals, time budget) are agreed over a CPU group of their own (``stop_reason``)
        self.control_group = dist.new_group(backend="gloo") if dist.get_world_size() > 1 else None
        self._stop_signal: Optional[str] = None
        self._saved_step: Optional[int] = None
        self.resumed_from = self._choose_checkpoint() if c.resume else None
        if self.resumed_from is not None:
            self.load_checkpoint(self.resumed_from)

    # ------------------------------------------------------------------------------------------ state
    def _part(self, full: dict, chunk) -> dict:
        """The part of a full state dict a pipeline chunk holds (all of it, checked strictly, otherwise)."""
        return stage_state_dict(full, chunk) if self.pipelined else full

    def _ema_chunks(self):
        return list(self.ema.model) if self.pipelined else [self.ema.model]

    def stage_weights(self, chunks, copy: bool = True) -> dict:
        """This pipeline stage's weights, full over TP (the export gathers), under official global names;
        ``copy=False``: the live tensors where there is nothing to gather (a save stages them itself)."""
        return {global_key(chunk, k): v for chunk in chunks
                for k, v in export_official_state_dict(chunk, copy=copy).items()}

    def full_state_dict(self, chunks) -> dict:
        """Official-named full weights on every rank: gathered over TP by the export, over pipeline stages
        here (collective; for tests and tools, checkpoints do not need it)."""
        local = self.stage_weights(chunks)
        if not self.pipelined:
            return local
        parts = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(parts, local, group=parallel_state.get_pipeline_model_parallel_group())
        return {k: v for part in parts for k, v in part.items()}

    def _trainer_info(self) -> dict:
        p = self.cfg.parallel
        layout = {"tensor_parallel": p.tensor_parallel, "pipeline_parallel": p.pipeline_parallel,
                  "virtual_stages": p.virtual_stages, "data_parallel": self.dp_size, "engine": self.engine.name,
                  "world_size": dist.get_world_size()}
        return ckpt.run_info(self.cfg, self.step, layout, self.nonfinite_steps, self.code)

    def save(self) -> Path:
        """Collective: start writing a checkpoint of this step (``train/checkpoint.py``). Every tensor goes in
        under its official full name: weights gathered over TP, optimizer state per parameter gathered
        over TP here and over DP by the engine."""
        state: Dict[str, torch.Tensor] = {}
        for which, chunks in (("model", self.chunks), ("ema", self._ema_chunks())):
            state.update({f"{which}/{k}": v for k, v in self.stage_weights(chunks, copy=False).items()})
        engine_state = self.engine.state_dict()
        for chunk, params in zip(self.chunks, engine_state["params"], strict=True):
            _, tp_size, group = model_tp(chunk)
            for kind in sorted({k for kinds in params.values() for k in kinds}):
                local = {name: kinds[kind] for name, kinds in params.items()}
                full = gather_state_dict(local, chunk.args, group=group) if tp_size > 1 else local
                state.update({f"optim/{kind}/{global_key(chunk, name)}": t for name, t in full.items()})
        state[ckpt.rng_key(self.rank)] = ckpt.pack(ckpt.rng_state())
        info = self._trainer_info()
        if self.rank == 0:
            state["counters"] = ckpt.pack(engine_state["counters"])
            state["trainer"] = ckpt.pack(info)
            state["config"] = ckpt.pack(asdict(self.cfg))
        self._saved_step = self.step
        return self.checkpointer.save(self.step, state, {"layout": info["layout"], "code": info["code"]})

    def _choose_checkpoint(self) -> Optional[Path]:
        """Rank 0 removes unfinished saves, verifies the checkpoints newest first and tells every rank."""
        found = [None, []]
        if self.rank == 0:
            notes = [f"removed the unfinished checkpoint save {p}" for p in ckpt.remove_unfinished(self.out)]
            path = ckpt.latest(self.out, report=notes.append)
            found = [None if path is None else str(path), notes]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(found, src=0)
        self.notes = found[1]
        return None if found[0] is None else Path(found[0])

    def load_checkpoint(self, directory: Path) -> None:
        """Collective: continue from ``directory``, written by any layout and engine."""
        fmt = ckpt.manifest(directory).get("format")
        if fmt != ckpt.FORMAT:
            raise ckpt.CheckpointError(f"checkpoint {directory} has format {fmt!r}, this sfd_scale reads {ckpt.FORMAT!r} "
                                       f"(written by an older version): start a new train.output_dir, or take its "
                                       f"weights with checkpoint.init_from")
        meta = ckpt.stored_keys(directory)
        objects = ["counters", "trainer"] + ([ckpt.rng_key(self.rank)] if ckpt.rng_key(self.rank) in meta else [])
        kinds = [k for k in ADAM_KINDS + ("master",) if any(key.startswith(f"optim/{k}/") for key in meta)]
        keys = list(objects)
        for chunk in self.chunks:
            names = [k for k in chunk.state_dict() if not k.endswith("_extra_state")]
            keys += [f"{which}/{global_key(chunk, k)}" for which in ("model", "ema") for k in names]
            keys += [f"optim/{kind}/{global_key(chunk, n)}" for kind in kinds
                     for n, p in chunk.named_parameters() if p.requires_grad]
        try:
            state = ckpt.empty_like_stored(directory, keys, meta)
        except ckpt.CheckpointError as err:
            raise ckpt.CheckpointError(f"{err}: it does not fit this model (model.* settings changed?)") from None
        ckpt.load(directory, state, self.checkpointer.group)
        info = ckpt.unpack(state["trainer"])
        for key, name in (("global_batch_size", "train.global_batch_size"), ("seed", "train.seed")):
            if info[key] != getattr(self.cfg.train, key):
                raise ckpt.CheckpointError(f"checkpoint {directory} was trained with {name}={info[key]}, this run has "
                                           f"{getattr(self.cfg.train, key)}: the data order and random draws would "
                                           f"not continue (use a new train.output_dir, or checkpoint.init_from)")

        def part(prefix: str, chunk) -> dict:
            return self._part({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, chunk)

        params = []
        for chunk, ema_chunk in zip(self.chunks, self._ema_chunks()):
            load_official_state_dict(chunk, part("model/", chunk))
            load_official_state_dict(ema_chunk, part("ema/", chunk))
            tp_rank, tp_size, _ = model_tp(chunk)
            per: Dict[str, dict] = {}
            for kind in kinds:
                full = part(f"optim/{kind}/", chunk)
                local = shard_state_dict(full, chunk.args, tp_rank, tp_size) if tp_size > 1 else full
                for name, t in local.items():
                    per.setdefault(name, {})[kind] = t
            params.append(per)
        self.engine.load_state_dict({"params": params, "counters": ckpt.unpack(state["counters"])})
        if ckpt.rng_key(self.rank) in state:
            ckpt.set_rng_state(ckpt.unpack(state[ckpt.rng_key(self.rank)]))
        self.step, self.nonfinite_steps = int(info["step"]), int(info["nonfinite_steps"])
        self._saved_step = self.step

    # ------------------------------------------------------------------------------------------ steps
    def loader(self):
        """This data-parallel rank's share of every global batch, from the current step on (the ranks of one
        model replica, TP x PP, read the same samples)."""
        where = Placement(self.cfg.train.global_batch_size, self.dp_rank, self.dp_size,
                          replication=dist.get_world_size() // self.dp_size,
                          num_workers=self.cfg.data.num_workers if self.cfg.data.source != "demo" else 0,
                          pin_memory=self.device.type == "cuda")
        return self.data.batches(self.step, where)

    def step_inputs(self, batch: dict) -> MicroBatch:
        """This rank's samples of the step on the device, with their draws (base time, noise, dropped labels)
        keyed by (train.seed, step, sample index) and made there (``micro_batch.TrainingDraws``)."""
        x1 = batch["latent"].to(self.device, non_blocking=True)
        index = batch["index"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        repa = None
        if self.cfg.model.use_repa:  # shards keep REPA features in their stored dtype (float16) until here
            repa = batch["repa"].to(self.device, non_blocking=True).float()
        return self.draws(self.step, x1, label, index, repa)

    def train_step(self, batch) -> dict:
        """One optimizer step; returns the engine's device metrics (no host sync). A step whose loss (or grad
        norm, with clipping) is NaN / Inf on any rank changes nothing (the engine skips the update, the EMA its step,
        by a device flag, ``metrics['nonfinite']``); it is counted when the trainer next reads its metrics."""
        self.model.train()
        micro = local_micro_batches(self.step_inputs(batch), self.engine.micro_batch_size, 0, 1)
        metrics = self.engine.train_step(micro, self.objective)
        self.ema.update(self.engine.ema_sources(), skip=metrics["nonfinite"])
        self.step += 1
        return metrics

    def _on_signal(self, signum, frame) -> None:  # only notes it: the step in progress finishes first
        self._stop_signal = signal.Signals(signum).name

    def stop_reason(self, started: float, agree: bool = False) -> Optional[str]:
        """Why every rank stops after this step (a signal reached any rank, or rank 0's wall-clock budget ran
        out), or None. One process decides every step; several agree (a gloo all-reduce, collective) every
        ``train.stop_check_every`` steps and whenever ``agree`` (checkpoint steps); otherwise None."""
        budget = self.cfg.train.time_budget_s
        if self.control_group is not None and not agree and self.step % self.cfg.train.stop_check_every:
            return None
        flags = torch.tensor([self._stop_signal is not None,
                              self.rank == 0 and budget > 0 and time.monotonic() - started >= budget], dtype=torch.int32)
        if self.control_group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control_group)
        if flags[0]:
            return f"signal {self._stop_signal or 'received by another rank'}"
        if flags[1]:
            return f"train.time_budget_s={budget:g} reached"
        return None

    def sample_grid(self, name: str) -> Optional[str]:
        """Collective under TP (every rank samples); rank 0 writes the PNG. Not with pipeline stages:
        sample those runs from their checkpoint (tools/sample.py)."""
        if self.pipelined:
            return None
        path = str(self.out / "samples" / f"{name}.png")
        return save_sample_grid(self.ema.model, self.cfg, path if self.rank == 0 else None, decode=self.data.decode,
                                num_classes=self.data.num_classes, device=self.device)

    def evaluate_fid(self) -> Optional[dict]:
        """Collective: FID of ``eval.fid_images`` EMA samples against ``eval.fid_reference``. Every DP rank
        samples its share (a TP group together) into ``<output_dir>/fid/step_…`` (resumable); rank 0
        merges and computes the metrics (None on other ranks)."""
        from ..eval.fid import InceptionFeatures, Reference, evaluate, load_reference
        from ..eval.fid_sampling import merge_samples, sample_for_fid

        e = self.cfg.eval
        out = self.out / "fid" / f"step_{self.step:07d}"
        tp_group = (parallel_state.get_tensor_model_parallel_group()
                    if parallel_state.get_tensor_model_parallel_world_size() > 1 else None)
        sample_for_fid(self.ema.model, self.cfg, out, e.fid_images, self.data.decode, batch_size=e.fid_batch,
                       num_classes=self.data.num_classes, rank=self.dp_rank, world_size=self.dp_size,
                       device=self.device, checkpoint=f"step {self.step}", png=False, progress=False, merge=False,
                       group=tp_group)
        if dist.get_world_size() > 1:
            dist.barrier()
        if self.rank != 0:
            return None
        if not hasattr(self, "_fid_reference"):  # the network and the reference statistics, once per run
            self._inception = InceptionFeatures(e.inception, self.device)
            source = e.fid_reference
            if source == "demo":  # the digits the demo trains on (rebuilt: deterministic)
                from ..data.demo import build_demo_latents, images_to_uint8

                demo = build_demo_latents(seed=self.cfg.train.seed, semantic_chans=self.cfg.sfd.semantic_chans,
                                          num_samples=self.cfg.data.demo_samples)
                source = images_to_uint8(demo.images).numpy().repeat(3, axis=-1)
            self._fid_reference: Reference = load_reference(source, self._inception, e.fid_batch)
        npz, _ = merge_samples(out)
        return evaluate(npz, self._fid_reference, extractor=self._inception, batch_size=e.fid_batch,
                        fid_method="fast", device=self.device)

    # ------------------------------------------------------------------------------------------ loop
    def _settle(self, window: StepWindow, logger: RunLogger) -> None:
        """Read the pending steps' device metrics (one host sync); count and report the skipped ones."""
        for record in window.settle():
            if record.nonfinite:
                self.nonfinite_steps += 1
                logger.write(f"step {record.step}: skipped, no update (non-finite loss or grad norm, seen at step "
                             f"{self.step}); {self.nonfinite_steps} of "
                             f"train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}")

    def hot_path_line(self) -> str:
        """The start-up line naming what the step runs: attention backend, optimizer, compile, precision."""
        bf16 = self.cfg.train.precision == "bf16"
        args = self.chunks[0].args
        attention = attention_backend(self.device, torch.bfloat16 if bf16 else torch.float32,
                                      args.hidden_size // args.num_heads)
        weights = str(next(self.chunks[0].parameters()).dtype).replace("torch.", "")
        modules = sum(len(compiled_modules(chunk)) for chunk in self.chunks)
        compiled = f"on (torch.compile of {modules} modules: blocks, final layer, REPA projector)" if self.compiled else "off"
        return (f"hot path: attention {attention}; optimizer {self.engine.optimizer_impl}; compile {compiled}; "
                f"precision: weights {weights}, autocast {'bfloat16' if bf16 else 'off'}, "
                f"grad reduce {self.engine.grad_reduce_dtype()}")

    def fit(self) -> dict:
        """Train to ``train.max_steps``. Returns a summary; its ``exit_status`` is ``REQUEUE_EXIT`` when the run
        stopped early on a signal or its time budget (after writing a checkpoint), else 0."""
        cfg = self.cfg
        main = self.rank == 0
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(cfg))
        logger = RunLogger(str(self.out), cfg.logging.wandb_mode if main else "disabled", cfg.logging.project,
                           cfg.logging.run_name, asdict(cfg), cfg.train.max_steps, self.step,
                           cfg.logging.progress and main, quiet=not main)
        n_params = sum(count_parameters(c) for c in self.chunks)
        env = os.environ
        logger.write(f"start: job {env.get('SLURM_JOB_ID', '-')} restart {env.get('SLURM_RESTART_COUNT', '0')}, "
                     f"{dist.get_world_size()} ranks, sfd_scale {self.code.get('git_commit', self.code['sfd_scale'])}"
                     + (" (modified)" if self.code.get("git_modified") else ""))
        for note in self.notes:
            logger.write(note)
        self.checkpointer.report = logger.write  # one line per save: how long it blocked training
        logger.write(f"model {cfg.model.name} ({n_params / 1e6:.2f}M params per TP rank) on {self.device}, "
                     f"engine {self.engine.name}, TP {cfg.parallel.tensor_parallel} x PP {cfg.parallel.pipeline_parallel}"
                     f" x DP {self.dp_size}; data: {self.data.description}"
                     + (f"; resumed from {self.resumed_from} (step {self.step})" if self.resumed_from else "; from scratch"))
        logger.write(self.hot_path_line())
        for note in self.engine.notes:
            logger.write(f"warning: {note}")
        start_step, t0, first_loss, last_loss = self.step, time.time(), None, None
        started, window, exit_status, grid, final_ckpt = time.monotonic(), StepWindow(), 0, None, None
        handlers = {name: signal.signal(getattr(signal, name), self._on_signal) for name in cfg.train.requeue_signals}
        try:
            for batch in DevicePrefetcher(self.loader(), self.device):
                if self.step >= cfg.train.max_steps:
                    break
                metrics = self.train_step(batch)
                window.add(self.step, metrics)
                logger.advance()
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    self._settle(window, logger)  # the one host read of this log interval
                    records = window.take()
                    first_loss, last_loss = _loss_span(records, first_loss, last_loss)
                    line = log_line(records, self.nonfinite_steps)
                    line["steps/s"] = (self.step - start_step) / max(time.time() - t0, 1e-9)
                    logger.log(self.step, line)
                checkpoint_step = bool(cfg.checkpoint.every) and self.step % cfg.checkpoint.every == 0
                if checkpoint_step:
                    self._settle(window, logger)  # the checkpoint counts the skipped steps
                if self.nonfinite_steps >= cfg.train.max_nonfinite_steps:
                    self.save()
                    self.checkpointer.wait()
                    raise FloatingPointError(f"{self.nonfinite_steps} steps had a non-finite loss or grad norm "
                                             f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); "
                                             f"stopped at step {self.step} with a checkpoint in {self.out}")
                if cfg.eval.fid_every and self.step % cfg.eval.fid_every == 0:
                    scores = self.evaluate_fid()
                    if main:
                        logger.log(self.step, {k: v for k, v in scores.items() if isinstance(v, (int, float))})
                        logger.write(f"step {self.step}: FID {scores['fid']:.3f} ({cfg.eval.fid_images} EMA samples)")
                if cfg.train.sample_every and self.step % cfg.train.sample_every == 0:
                    grid = self.sample_grid(f"step_{self.step:07d}")
                    if main and grid:
                        logger.log_image(self.step, "samples", grid)
                if checkpoint_step:
                    self.save()
                reason = self.stop_reason(started, agree=checkpoint_step)
                if reason is not None:
                    logger.write(f"stopping at step {self.step}: {reason}; writing a checkpoint, then exit status "
                                 f"{REQUEUE_EXIT} (requeue)")
                    exit_status = REQUEUE_EXIT
                    break
            self._settle(window, logger)
            first_loss, last_loss = _loss_span(window.take(), first_loss, last_loss)
            if self._saved_step != self.step:
                self.save()
            final_ckpt = ckpt.checkpoint_dir(self.out, self.step)
            self.checkpointer.wait()
            logger.write(f"checkpoint {final_ckpt} written")
            if exit_status == 0:
                grid = self.sample_grid("final")
                if main and grid:
                    logger.log_image(self.step, "samples", grid)
        finally:
            for name, handler in handlers.items():
                signal.signal(getattr(signal, name), handler)
            self.checkpointer.wait()
            logger.close()
            self.data.close()
        elapsed = time.time() - t0
        return {"steps": self.step, "steps_this_run": self.step - start_step, "seconds": round(elapsed, 1),
                "params_M": round(n_params / 1e6, 3), "first_loss": first_loss, "last_loss": last_loss,
                "checkpoint": str(final_ckpt), "samples": grid, "exit_status": exit_status,
                "nonfinite_steps": self.nonfinite_steps}


def _loss_span(records, first: Optional[float], last: Optional[float]):
    """(first, last) finite loss of the run so far, updated with newly read step records."""
    finite = [r.loss for r in records if not r.nonfinite]
    return (finite[0] if first is None and finite else first), (finite[-1] if finite else last)


def summary_text(summary: dict, cfg: Config) -> str:
    """One paragraph for the end of a run."""
    loss = (f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
            if summary["first_loss"] is not None and summary["last_loss"] is not None else "no new steps")
    return (f"Trained {cfg.model.name} ({summary['params_M']:.2f}M params) with SFD (texture "
            f"{cfg.sfd.texture_chans} + semantic {cfg.sfd.semantic_chans} channels, dt={sfd_spec(cfg).delta_t}) for "
            f"{summary['steps_this_run']} steps (total {summary['steps']}) in {summary['seconds']:.0f}s; {loss}. "
            + (f"EMA samples ({cfg.sample.method}, {cfg.sample.guidance} guidance x{cfg.sample.cfg_scale}): "
               f"{summary['samples']}. " if summary["samples"] else "No sample grid. ")
            + f"Checkpoint: {summary['checkpoint']}."
            + (f" Stopped early to be requeued (exit status {REQUEUE_EXIT})." if summary["exit_status"] else ""))
