"""The one training loop: batch -> SFD objective -> optimizer step -> EMA -> log -> samples -> checkpoint.

Single process today (TP = PP = DP = 1 through the same megatron-core layers the parallel engine will
use). Every random draw of step k (noise, base times, label dropout) comes from a generator seeded by
(train.seed, k), and batch k is a pure function of (train.seed, k), so a resumed run repeats exactly
what an uninterrupted one would have done.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from ..config import Config, model_args, objective_config, sfd_spec, to_yaml
from ..data.sources import ResumableBatchSampler, build_training_data
from ..diffusion.sfd import SFDObjective
from ..eval.generate import save_sample_grid
from ..logging import RunLogger
from ..models.lightningdit import LightningDiT, count_parameters
from ..models.official import export_official_state_dict, load_official_state_dict, read_checkpoint
from ..parallel.layout import ParallelLayout, initialize
from . import checkpoint as ckpt
from .ema import EMA


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no GPU is available")
    return torch.device(name)


def _collate(items):
    return tuple(torch.stack(parts) for parts in zip(*items))


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = _device(cfg.train.device)
        self.out = Path(cfg.train.output_dir)
        initialize(ParallelLayout(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel))
        torch.manual_seed(cfg.train.seed)  # model initialisation

        self.spec = sfd_spec(cfg)
        self.data = build_training_data(cfg)
        self.spec.check_channels(self.data.channels, f"the data's latent channels ({cfg.data.source})")
        if self.data.num_classes is not None and self.data.num_classes > cfg.model.num_classes:
            raise ValueError(f"model.num_classes ({cfg.model.num_classes}) is smaller than the data's "
                             f"{self.data.num_classes} classes")

        if cfg.model.use_repa and not self.data.has_repa_features:
            raise ValueError(f"model.use_repa is on but the training data has no REPA target features "
                             f"(feats_dino in the shards): {self.data.description}")
        self.model = LightningDiT(model_args(cfg)).to(self.device)
        if cfg.checkpoint.init_from:
            load_official_state_dict(self.model, read_checkpoint(cfg.checkpoint.init_from, which="ema"))
        self.ema = EMA(self.model, cfg.train.ema_decay)
        o = cfg.optim
        fused = o.fused if o.fused is not None else self.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=o.lr,
                                           betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                                           fused=fused)
        warmup = max(o.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.objective = SFDObjective(self.spec, objective_config(cfg))
        self.step = 0
        resumed = ckpt.latest(self.out) if cfg.checkpoint.resume else None
        if resumed is not None:
            self.load_state(ckpt.load(resumed))
        self.resumed_from = resumed

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"model": export_official_state_dict(self.model), "ema": export_official_state_dict(self.ema.model),
                "opt": self.optimizer.state_dict(), "config": asdict(self.cfg),
                "trainer": {"step": self.step, "scheduler": self.scheduler.state_dict()}}

    def load_state(self, state: dict) -> None:
        load_official_state_dict(self.model, state["model"])
        load_official_state_dict(self.ema.model, state["ema"])
        self.optimizer.load_state_dict(state["opt"])
        self.scheduler.load_state_dict(state["trainer"]["scheduler"])
        self.step = int(state["trainer"]["step"])

    def save(self) -> Path:
        return ckpt.save(self.out, self.step, self.state_dict())

    # ------------------------------------------------------------------------------------------ steps
    def loader(self) -> DataLoader:
        sampler = ResumableBatchSampler(len(self.data.dataset), self.cfg.train.global_batch_size,
                                        self.cfg.train.seed, self.cfg.data.hflip, start_batch=self.step)
        workers = self.cfg.data.num_workers if self.cfg.data.source != "demo" else 0
        return DataLoader(self.data.dataset, batch_sampler=sampler, num_workers=workers, collate_fn=_collate,
                          pin_memory=self.device.type == "cuda", persistent_workers=workers > 0)

    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batch) -> dict:
        x1, y = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)
        repa = batch[2].to(self.device, non_blocking=True) if self.model.args.use_repa else None
        # One seed per step: label dropout (global RNG inside the model), base times and noise.
        torch.manual_seed(self.cfg.train.seed * 1_000_003 + self.step + 1)
        self.model.train()
        with self.autocast():
            terms = self.objective.loss_terms(self.model, x1, y, repa_target=repa)
        loss = terms["total"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
                     if self.cfg.optim.grad_clip > 0 else None)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update()
        self.step += 1
        metrics = {"loss": loss.item(), "lr": self.scheduler.get_last_lr()[0]}
        for key in ("loss", "cos_loss", "repa_loss"):
            if key in terms:
                metrics[f"loss/{key}"] = terms[key].mean().item()
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm.item()
        return metrics

    def sample_grid(self, name: str) -> str:
        path = str(self.out / "samples" / f"{name}.png")
        return save_sample_grid(self.ema.model, self.cfg, path, decode=self.data.decode,
                                num_classes=self.data.num_classes, device=self.device)

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(to_yaml(cfg))
        logger = RunLogger(str(self.out), cfg.logging.wandb_mode, cfg.logging.project, cfg.logging.run_name,
                           asdict(cfg), cfg.train.max_steps, self.step, cfg.logging.progress)
        n_params = count_parameters(self.model)
        logger.write(f"model {cfg.model.name} ({n_params / 1e6:.2f}M params) on {self.device}; data: "
                     f"{self.data.description}" + (f"; resumed from {self.resumed_from}" if self.resumed_from else ""))
        start_step, t0, first_loss, last = self.step, time.time(), None, {}
        window = []
        try:
            for batch in self.loader():
                if self.step >= cfg.train.max_steps:
                    break
                last = self.train_step(batch)
                first_loss = last["loss"] if first_loss is None else first_loss
                window.append(last["loss"])
                logger.advance()
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    last["loss_avg"] = sum(window) / len(window)
                    last["steps/s"] = (self.step - start_step) / max(time.time() - t0, 1e-9)
                    logger.log(self.step, last)
                    window = []
                if cfg.train.sample_every and self.step % cfg.train.sample_every == 0:
                    logger.log_image(self.step, "samples", self.sample_grid(f"step_{self.step:07d}"))
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save()
            final_ckpt = self.save()
            grid = self.sample_grid("final")
            logger.log_image(self.step, "samples", grid)
        finally:
            logger.close()
        elapsed = time.time() - t0
        summary = {"steps": self.step, "steps_this_run": self.step - start_step, "seconds": round(elapsed, 1),
                   "params_M": round(n_params / 1e6, 3), "first_loss": first_loss, "last_loss": last.get("loss"),
                   "checkpoint": str(final_ckpt), "samples": grid}
        return summary


def summary_text(summary: dict, cfg: Config) -> str:
    """One paragraph for the end of a run."""
    loss = (f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
            if summary["first_loss"] is not None and summary["last_loss"] is not None else "no new steps")
    return (f"Trained {cfg.model.name} ({summary['params_M']:.2f}M params) with SFD (texture "
            f"{cfg.sfd.texture_chans} + semantic {cfg.sfd.semantic_chans} channels, dt={cfg.sfd.delta_t}) for "
            f"{summary['steps_this_run']} steps (total {summary['steps']}) in {summary['seconds']:.0f}s; {loss}. "
            f"EMA samples ({cfg.sample.method}, {cfg.sample.guidance} guidance x{cfg.sample.cfg_scale}): "
            f"{summary['samples']}. Checkpoint: {summary['checkpoint']}.")
