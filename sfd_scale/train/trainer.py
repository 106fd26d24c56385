"""The one training loop: batch -> SFD objective -> engine step -> EMA -> log -> samples -> checkpoint.

One loop for every engine (plain / megatron DDP / DeepSpeed ZeRO) and layout (TP x DP); the engine
behind ``parallel/engines/`` differs, this file does not. Global batch k is a pure function of
(train.seed, k) (``data/sources.py``) and every random draw of step k (base time, noise, label dropout)
is keyed by (train.seed, k, sample index): a resumed run repeats exactly what an uninterrupted one would
have done, and DP = 2 trains on exactly what DP = 1 trains on, whichever rank reads which sample.

No host sync between log steps: the draws are made on the device (``diffusion/keyed_noise.py``), the next
batch is copied on a side stream (``step_io.DevicePrefetcher``), the engines return device tensors and skip
a non-finite step on the device, the EMA folds the skip into its weight, and the metrics of a window of
steps are read once (``step_io.StepWindow``) at each ``train.log_every`` step, checkpoint and at the end;
the log line holds each loss term's window mean next to the loss and the window's wall-clock rates
(images/s, TFLOP/s, MFU, peak memory, data-wait share: ``step_io.WindowClock``).
A non-finite step is therefore reported (log.txt names it) and counted against
``train.max_nonfinite_steps`` at the next such read, up to ``log_every - 1`` steps later; reaching the limit
still saves a checkpoint and stops with an error. Stop requests (signals, time budget) are agreed between
ranks every ``train.stop_check_every`` steps and at every checkpoint step (one process: every step).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from megatron.core import parallel_state

from .. import atomic, checkpoint_store as store
from ..config import Config, ConfigError, model_args, objective_config, sfd_spec, to_yaml
from ..device import resolve_device
from ..errors import UserError, one_line
from ..data.sources import Placement, build_training_data
from ..diffusion.micro_batch import MicroBatch, TrainingDraws
from ..diffusion.sfd import SFDObjective
from ..eval.generate import save_sample_grid
from ..logging import RunLogger, show_progress
from ..models.flops import training_flops_per_image
from ..models.layers import attention_backend
from ..models.lightningdit import LightningDiT, count_parameters, parallel_config
from ..models.official import load_official_state_dict, read_checkpoint
from ..parallel.engines import build_engine, check_installed
from ..parallel.engines.base import local_micro_batches
from ..parallel.layout import ParallelLayout, initialize, placement_line
from ..parallel.optimizations import apply_activation_checkpointing, apply_compile, compile_enabled, compiled_modules
from ..parallel.pipeline import build_stages
from .ema import EMA, ShardedEMA, frozen_state
from .run_control import REQUEUE_EXIT, RunControl
from .state import TrainingState, choose_checkpoint, chunk_part, run_info
from .step_io import DevicePrefetcher, StepWindow, WindowClock, log_line


class Trainer:
    def __init__(self, cfg: Config, device: Optional[torch.device] = None):
        """``device`` overrides ``train.device``: the cost model (``bench/cost_model.py``) passes
        ``torch.device("meta")`` to count a step of a model too big to materialise."""
        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)
        # every start-up check runs before fit() writes anything: a failed start leaves no half-made run directory
        if (why := atomic.unwritable_reason(self.out)) is not None:
            raise ConfigError(f"train.output_dir={self.out} cannot hold the run: {why}; choose another directory")
        check_installed(cfg.parallel.engine)  # an optional engine library (DeepSpeed) that is not installed
        # first: under srun this sets RANK / LOCAL_RANK from SLURM's variables, which the device needs
        initialize(ParallelLayout(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                                  cfg.parallel.virtual_stages))
        self.device = torch.device(device) if device is not None else resolve_device(cfg.train.device)
        self.pipelined = cfg.parallel.pipeline_parallel > 1
        self.rank = dist.get_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        torch.manual_seed(cfg.train.seed)  # model initialisation: identical on every rank

        self.spec = sfd_spec(cfg)
        self.data = build_training_data(cfg)
        _check_fits_data(cfg, self.spec, self.data)

        # this rank's model: the whole LightningDiT, or its pipeline chunks (one per virtual stage)
        # on meta the weights are never allocated (megatron's CPU initialisation runs on meta tensors)
        with torch.device("meta") if self.device.type == "meta" else contextlib.nullcontext():
            chunks = self._new_chunks()
        chunks = [c.to(self.device) for c in chunks]
        if cfg.checkpoint.init_from:
            try:
                full = read_checkpoint(cfg.checkpoint.init_from, which="ema")
                for chunk in chunks:
                    load_official_state_dict(chunk, chunk_part(full, chunk, self.pipelined))
            except (ValueError, KeyError, FileNotFoundError) as err:  # ours say what to do; a misfit does not
                advice = "" if isinstance(err, UserError) else "; give a checkpoint of this model (model.*)"
                raise store.CheckpointError(f"checkpoint.init_from={cfg.checkpoint.init_from}: {one_line(err)}"
                                            f"{advice}") from err
        self.n_params = sum(count_parameters(c) for c in chunks)  # (ZeRO-3 partitions them from here on)
        self.engine = build_engine(chunks if self.pipelined else chunks[0], cfg)
        self.chunks = chunks
        self.model = nn.ModuleList(chunks) if self.pipelined else chunks[0]
        self.ema = self._new_ema()
        apply_activation_checkpointing(chunks, cfg.train.activation_checkpointing)
        self.compiled = compile_enabled(cfg.train.compile, self.device)
        if self.compiled:  # after the EMA copy: it stays eager
            apply_compile(chunks)
        self.objective = SFDObjective(self.spec, objective_config(cfg))
        self.draws = TrainingDraws(cfg.train.seed, lognorm=self.objective.config.use_lognorm,
                                   label_dropout=cfg.model.class_dropout_prob, null_label=cfg.model.num_classes)
        self.step, self.nonfinite_steps = 0, 0
        self.code = store.code_version()  # once: the run log and every checkpoint
        c = cfg.checkpoint
        self.checkpointer = store.Checkpointer(self.out, c.keep_last, c.keep_every, c.asynchronous)
        self.control = RunControl(cfg.train, self.rank, dist.get_world_size())  # signals, budget, NaN policy
        self._saved_step: Optional[int] = None
        self.window = StepWindow()  # steps not logged yet: checkpointed, so loss_avg continues across a resume
        self.state = TrainingState(chunks, self.ema, self.engine, self.pipelined)
        self.resumed_from, self.notes = (choose_checkpoint(self.out, self.rank, c.start_fresh_over_unusable)
                                         if c.resume else (None, []))
        if self.resumed_from is not None:
            self.load_checkpoint(self.resumed_from)

    def _new_chunks(self, init_seed: Optional[int] = None) -> list:
        """This rank's model: the whole LightningDiT, or its pipeline chunks (one per virtual stage), as the
        trainer trains it. Label dropout is drawn with the step's other draws (``self.draws``), not inside the
        model from a per-rank RNG, so that every layout drops the same labels."""
        tp_config = parallel_config(tensor_parallel=self.cfg.parallel.tensor_parallel)  # the layout set up
        args = model_args(self.cfg)
        chunks = build_stages(args) if self.pipelined else [LightningDiT(args, tp_config, init_seed=init_seed)]
        for chunk in chunks:
            if chunk.stage.pre_process:
                chunk.y_embedder.dropout_prob = 0.0
        return chunks

    def _new_ema(self):
        """The EMA: whole on every rank, or sharded with the engine's fp32 master weights
        (``parallel.shard_ema``, always at ZeRO-3; ``train/ema.py``)."""
        if not self.engine.shard_ema:
            return EMA(self.model, self.cfg.train.ema_decay)
        rng_devices = [torch.cuda.current_device()] if self.device.type == "cuda" else []

        def skeleton() -> nn.Module:  # the model's structure on meta, the run's RNG streams left as they were
            with torch.random.fork_rng(devices=rng_devices), torch.device("meta"):
                chunks = self._new_chunks(init_seed=0)
            return nn.ModuleList(chunks) if self.pipelined else chunks[0]

        with self.engine.full_parameters():  # ZeRO-3 partitions the frozen pos_embed too
            frozen = frozen_state(self.model)
        return ShardedEMA(skeleton, self.engine.master_pieces(), self.engine.master_group, frozen,
                          self.cfg.train.ema_decay, self.device)

    # ------------------------------------------------------------------------------------------ state
    def _trainer_info(self) -> dict:
        p = self.cfg.parallel
        layout = {"tensor_parallel": p.tensor_parallel, "pipeline_parallel": p.pipeline_parallel,
                  "virtual_stages": p.virtual_stages, "data_parallel": self.dp_size, "engine": self.engine.name,
                  "world_size": dist.get_world_size()}
        return run_info(self.cfg, self.step, layout, self.nonfinite_steps, self.code, self.window.state())

    def save(self) -> Path:
        """Collective: start writing a checkpoint of this step (contents: ``train/state.py``; directory and
        background write: ``checkpoint_store.py``)."""
        info = self._trainer_info()
        stats = self.data.latent_stats
        state = self.state.collect(self.cfg, self.rank, info, None if stats is None else stats.to_object())
        self._saved_step = self.step
        return self.checkpointer.save(self.step, state, {"layout": info["layout"], "code": info["code"]})

    def load_checkpoint(self, directory: Path) -> None:
        """Collective: continue from ``directory``, written by any layout and engine."""
        state, kinds, info = self.state.read(directory, self.rank, self.checkpointer.group)
        for key, name in (("global_batch_size", "train.global_batch_size"), ("seed", "train.seed")):
            if info[key] != getattr(self.cfg.train, key):
                raise store.CheckpointError(f"checkpoint {directory} was trained with {name}={info[key]}, this run has "
                                           f"{getattr(self.cfg.train, key)}: the data order and random draws would "
                                           f"not continue (use a new train.output_dir, or checkpoint.init_from)")
        try:
            self.state.restore(state, kinds, self.rank)
        except ValueError as err:  # weights of another shape: the model.* settings changed since it was written
            raise store.CheckpointError(f"checkpoint {directory} does not fit this model ({one_line(err)}): resume "
                                        f"with the model.* settings it was trained with, or start a new "
                                        f"train.output_dir (checkpoint.init_from to take its weights)") from err
        self.step, self.nonfinite_steps = int(info["step"]), int(info["nonfinite_steps"])
        self.window.restore(info.get("log_window", []))  # absent in checkpoints of older versions
        self._saved_step = self.step

    # ------------------------------------------------------------------------------------------ steps
    def loader(self):
        """This data-parallel rank's share of every global batch, from the current step on (the ranks of one
        model replica, TP x PP, read the same samples)."""
        where = Placement(self.cfg.train.global_batch_size, self.dp_rank, self.dp_size,
                          replication=dist.get_world_size() // self.dp_size,
                          num_workers=self.cfg.data.num_workers if self.cfg.data.source != "demo" else 0,
                          pin_memory=self.device.type == "cuda", device=str(self.device))
        return self.data.batches(self.step, where)

    def step_inputs(self, batch: dict) -> MicroBatch:
        """This rank's samples of the step on the device, with their draws (base time, noise, dropped labels)
        keyed by (train.seed, step, sample index) and made there (``micro_batch.TrainingDraws``)."""
        x1 = batch["latent"].to(self.device, non_blocking=True)
        index = batch["index"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        repa = None
        if self.cfg.model.use_repa:  # stored REPA features keep their dtype (float16) until here; online ones
            # (data.repa_features=online) were computed on the device already
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

    def sample_grid(self, name: str) -> Optional[str]:
        """Collective under TP (every rank samples); rank 0 writes the PNG. Not with pipeline stages:
        sample those runs from their checkpoint (sfd sample)."""
        if self.pipelined:
            return None
        path = str(self.out / "samples" / f"{name}.png")
        with self.ema.full_model() as ema_model:  # (a sharded EMA gathers it for the duration)
            return save_sample_grid(ema_model, self.cfg, path if self.rank == 0 else None, decode=self.data.decode,
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
        with self.ema.full_model() as ema_model:
            sample_for_fid(ema_model, self.cfg, out, e.fid_images, self.data.decode, batch_size=e.fid_batch,
                           num_classes=self.data.num_classes, rank=self.dp_rank, world_size=self.dp_size,
                           device=self.device, checkpoint=f"step {self.step}", png=False, progress=False,
                           merge=False, group=tp_group)
        if dist.get_world_size() > 1:
            dist.barrier()
        if self.rank != 0:
            return None
        if not hasattr(self, "_fid_reference"):  # the network and the reference statistics, once per run
            self._inception = InceptionFeatures(e.inception, self.device)
            # "demo": the images this run trains on (config.validate: only with data.source=demo)
            source = self.data.reference_images() if e.fid_reference == "demo" else e.fid_reference
            self._fid_reference: Reference = load_reference(source, self._inception, e.fid_batch)
        npz, _ = merge_samples(out)
        return evaluate(npz, self._fid_reference, extractor=self._inception, batch_size=e.fid_batch,
                        fid_method="fast", device=self.device)

    # ------------------------------------------------------------------------------------------ loop
    def hot_path_line(self) -> str:
        """The start-up line naming what the step runs: attention backend, optimizer, compile, precision."""
        bf16 = self.cfg.train.precision == "bf16"
        args = self.chunks[0].args
        attention = attention_backend(self.device, torch.bfloat16 if bf16 else torch.float32,
                                      args.hidden_size // args.num_heads)
        weights = str(next(self.chunks[0].parameters()).dtype).replace("torch.", "")
        modules = sum(len(compiled_modules(chunk)) for chunk in self.chunks)
        compiled = (f"on (torch.compile of {modules} modules: blocks, final layer, REPA projector)"
                    if self.compiled else "off")
        # fp32 weights under autocast: weight gradients written in fp32 by their GEMM (models/master_linear.py)
        grads = "fp32 from the GEMM" if bf16 and weights == "float32" else weights
        return (f"hot path: attention {attention}; optimizer {self.engine.optimizer_impl}; compile {compiled}; "
                f"precision: weights {weights}, autocast {'bfloat16' if bf16 else 'off'}, weight grads {grads}, "
                f"grad reduce {self.engine.grad_reduce_dtype()}")

    def _log_start(self, logger: RunLogger, n_params: int) -> None:
        cfg, env = self.cfg, os.environ
        logger.write(f"start: job {env.get('SLURM_JOB_ID', '-')} restart {env.get('SLURM_RESTART_COUNT', '0')}, "
                     f"{dist.get_world_size()} ranks, sfd_scale {self.code.get('git_commit', self.code['sfd_scale'])}"
                     + (" (modified)" if self.code.get("git_modified") else ""))
        logger.write(placement_line())  # collective: every rank is here
        for note in self.notes:
            logger.write(note)
        logger.write(f"model {cfg.model.name} ({n_params / 1e6:.2f}M params per TP rank) on {self.device}, "
                     f"engine {self.engine.name}, TP {cfg.parallel.tensor_parallel} x PP "
                     f"{cfg.parallel.pipeline_parallel} x DP {self.dp_size}; data: {self.data.description}"
                     + (f"; resumed from {self.resumed_from} (step {self.step})" if self.resumed_from
                        else "; from scratch"))
        logger.write(self.hot_path_line())
        if self.data.decode is None and not self.pipelined:
            logger.write("sample grids show a false-colour view of the first texture latent channels: set "
                         "sample.texture_vae to decode them to images")
        for note in self.engine.notes:
            logger.write(f"warning: {note}")

    def _settle(self, window: StepWindow, logger: RunLogger) -> None:
        """The pending steps' metrics read (one host sync), the skipped ones counted and reported."""
        self.nonfinite_steps = self.control.settle(window, logger, self.step, self.nonfinite_steps)

    def _between_steps(self, logger: RunLogger, window: StepWindow) -> Optional[str]:
        """After a step: the non-finite limit, FID, sample grid and checkpoint when due; returns why the run
        stops now (signal, time budget), or None."""
        cfg, main = self.cfg, self.rank == 0
        checkpoint_step = bool(cfg.checkpoint.every) and self.step % cfg.checkpoint.every == 0
        if checkpoint_step:
            self._settle(window, logger)  # the checkpoint counts the skipped steps
        if self.control.nonfinite_limit_reached(self.nonfinite_steps):
            self.save()
            self.checkpointer.wait()
            raise self.control.nonfinite_error(self.nonfinite_steps, self.step, self.out)
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
        return self.control.stop_reason(self.step, agree=checkpoint_step)

    def _log_window(self, logger: RunLogger, clock: WindowClock, span: tuple, start: tuple) -> tuple:
        """The log line of the steps since the last one: their metrics read (the one host sync of the log
        interval), then the wall-clock rates, timed now that the device has caught up: ``steps/s`` since
        ``start`` = (step, time.time()) of this process's start, the window's ``step_io.WindowClock`` columns.
        Returns the run's (first, last) finite loss so far."""
        self._settle(self.window, logger)
        records = self.window.take()
        line = log_line(records, self.nonfinite_steps)
        line["steps/s"] = (self.step - start[0]) / max(time.time() - start[1], 1e-9)
        logger.log(self.step, line | clock.columns(self.step))
        return _loss_span(records, *span)

    def fit(self) -> dict:
        """Train to ``train.max_steps``. Returns a summary; its ``exit_status`` is ``REQUEUE_EXIT`` when the run
        stopped early on a signal or its time budget (after writing a checkpoint), else 0."""
        cfg = self.cfg
        main = self.rank == 0
        if main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / "config.yaml").write_text(to_yaml(cfg))
            except OSError as err:  # e.g. the directory changed since the start-up check
                raise ConfigError(f"train.output_dir={self.out}: cannot write into it ({err})") from err
        logger = RunLogger(str(self.out), cfg.logging.wandb_mode if main else "disabled", cfg.logging.project,
                           cfg.logging.run_name, asdict(cfg), cfg.train.max_steps, self.step,
                           show_progress(cfg.logging.progress, rank=self.rank), quiet=not main)
        n_params = self.n_params
        self.checkpointer.report = logger.write  # one line per save: how long it blocked training
        self._log_start(logger, n_params)
        start_step, t0, span = self.step, time.time(), (None, None)  # span: first and last finite loss
        window, exit_status, grid, final_ckpt = self.window, 0, None, None
        clock = WindowClock(self.step, cfg.train.global_batch_size, training_flops_per_image(model_args(cfg)),
                            dist.get_world_size(), self.device, cfg.train.precision)
        try:
            with self.control.handling_signals():
                for batch in clock.timed(DevicePrefetcher(self.loader(), self.device)):
                    if self.step >= cfg.train.max_steps:
                        break
                    metrics = self.train_step(batch)
                    self.checkpointer.poll()  # a failed background save stops the run here, one step later
                    window.add(self.step, metrics)
                    logger.advance()
                    if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                        span = self._log_window(logger, clock, span, (start_step, t0))
                    reason = self._between_steps(logger, window)
                    if reason is not None:
                        logger.write(f"stopping at step {self.step}: {reason}; writing a checkpoint, then exit "
                                     f"status {REQUEUE_EXIT} (requeue)")
                        exit_status = REQUEUE_EXIT
                        break
                self._settle(window, logger)
                if self._saved_step != self.step:
                    self.save()  # with the steps not logged yet (a stop between log steps)
                first_loss, last_loss = _loss_span(window.take(), *span)
                final_ckpt = store.checkpoint_dir(self.out, self.step)
                self.checkpointer.wait()
                logger.write(f"checkpoint {final_ckpt} written")
                if exit_status == 0:
                    grid = self.sample_grid("final")
                    if main and grid:
                        logger.log_image(self.step, "samples", grid)
        finally:
            self.checkpointer.wait()
            logger.close()
            self.data.close()
        elapsed = time.time() - t0
        return {"steps": self.step, "steps_this_run": self.step - start_step, "seconds": round(elapsed, 1),
                "params_M": round(n_params / 1e6, 3), "first_loss": first_loss, "last_loss": last_loss,
                "checkpoint": str(final_ckpt), "samples": grid, "exit_status": exit_status,
                "nonfinite_steps": self.nonfinite_steps}


def _check_fits_data(cfg: Config, spec, data) -> None:
    """The model's settings against what the training data holds (channel split, classes, REPA features)."""
    try:
        spec.check_channels(data.channels, f"the data's latent channels ({cfg.data.source}, {cfg.data.path})")
    except ValueError as err:
        raise ConfigError(f"{err}: set sfd.texture_chans / sfd.semantic_chans to the data's split") from None
    if data.num_classes is not None and data.num_classes > cfg.model.num_classes:
        raise ConfigError(f"model.num_classes ({cfg.model.num_classes}) is smaller than the data's "
                          f"{data.num_classes} classes: raise it to at least {data.num_classes}")
    if cfg.model.use_repa and not data.has_repa_features:
        raise ConfigError(f"model.use_repa is on but the training data has no REPA target features "
                          f"(feats_dino in the shards): {data.description}; set model.use_repa=false or extract "
                          f"with features")


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
