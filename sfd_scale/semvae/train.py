"""SemVAE training: typed config (schema <- YAML <- ``key=value``), data sources, LR schedule and the loop.

Data sources: ``random`` draws synthetic (B, 768, G, G) features from a fixed seeded low-rank Gaussian (smoke
tests, CPU demos); ``shards`` reads precomputed DINOv2 features from mosaicml-streaming MDS shards (column
``feats_dino``, optionally ``feats_dino_flip``), whose only augmentation is the stored horizontal flip (the crop
happens before DINOv2); ``images`` decodes an image folder with DALI, cuts the paper's random crops (Tab. 7) and
computes the DINOv2 features of every batch (``sfd_scale.data.semvae_images``: the data layer, above this one,
so ``train_semvae`` is handed its constructor, as ``sfd semvae`` does).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.optim.lr_scheduler import LambdaLR

from ..atomic import atomic_path
from ..device import resolve_device
from ..config import ConfigError
from ..logging import RunLogger, show_progress
from .model import SemanticVAE, feature_cosine, save_semvae, semvae_loss
from .settings import (SemVAEDataConfig, SemVAEOptimConfig, SemVAETrainConfig, SemVAETrainSection,  # noqa: F401
                       load_semvae_config, validate_semvae)

STATE_FILE = "semvae_state.pt"      # optimizer + scheduler + weights + data position, for exact resume
FINAL_FILE = "semvae.safetensors"


def semvae_lr(step: int, cfg: SemVAETrainConfig) -> float:
    """LR of optimizer step ``step`` (0-based): linear warm-up, constant, then cosine down to final_lr."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if step < o.constant_until:
        return o.lr
    progress = min(1.0, (step - o.constant_until) / max(1, o.total_steps - o.constant_until))
    return o.final_lr + (o.lr - o.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _generator(*key: int, device="cpu") -> torch.Generator:
    """A generator seeded from an integer key tuple (e.g. (seed, stream, step)) through numpy's SeedSequence."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0]) >> 1
    return torch.Generator(device=device).manual_seed(seed)


class _Source:
    """A feature source: ``batch(step)``, ``eval_batch()`` and the resumable position (none by default)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


class RandomFeatures(_Source):
    """Per token f = mean + basis @ z + noise * eps, z ~ N(0, I_rank): a fixed low-rank Gaussian.

    Batch k comes from a generator seeded by (train.seed, k), so a resumed run sees the same batches.
    """

    def __init__(self, cfg: SemVAETrainConfig):
        d, dim = cfg.data, cfg.model.feature_dim
        g = _generator(d.random_seed, 0)
        self.basis = torch.randn(dim, d.random_rank, generator=g) / math.sqrt(d.random_rank)
        self.mean = 0.5 * torch.randn(dim, generator=g)
        self.cfg = cfg

    def _draw(self, g: torch.Generator, n: int) -> torch.Tensor:
        d, side = self.cfg.data, self.cfg.data.grid_size
        z = torch.randn(n, d.random_rank, side, side, generator=g)
        noise = torch.randn(n, self.basis.shape[0], side, side, generator=g)
        return torch.einsum("dr,brhw->bdhw", self.basis, z) + self.mean[:, None, None] + d.random_noise * noise

    def batch(self, step: int) -> torch.Tensor:
        return self._draw(_generator(self.cfg.train.seed, 1, step), self.cfg.train.batch_size)

    def eval_batch(self) -> torch.Tensor:
        return self._draw(_generator(self.cfg.data.random_seed, 2), self.cfg.data.eval_size)


def _collate(samples: list) -> dict:
    """Stack the feature columns into float32 tensors (np.stack copies: streaming's arrays are read-only)."""
    cols = [c for c in ("feats_dino", "feats_dino_flip") if c in samples[0]]
    return {c: torch.from_numpy(np.stack([s[c] for s in samples]).astype(np.float32)) for c in cols}


class ShardFeatures(_Source):
    """Precomputed DINOv2 features from MDS shards, shuffled by streaming with shuffle_seed = train.seed."""

    def __init__(self, cfg: SemVAETrainConfig):
        from streaming import StreamingDataLoader, StreamingDataset

        from ..streaming_leases import StreamingLease

        d, bs = cfg.data, cfg.train.batch_size
        for p in filter(None, (d.path, d.eval_path)):
            if not (Path(p) / "index.json").is_file():
                raise ConfigError(f"data.path / data.eval_path: no MDS index.json in {p}")
        self.cfg, self.iterator = cfg, None
        self.lease = StreamingLease.acquire()  # reclaims what a killed run left in /dev/shm
        self.dataset = StreamingDataset(local=d.path, shuffle=True, shuffle_seed=cfg.train.seed, batch_size=bs)
        self.lease.record(self.dataset)
        self.loader = StreamingDataLoader(self.dataset, batch_size=bs, num_workers=d.num_workers,
                                          collate_fn=_collate, drop_last=True)
        self.eval_dataset = StreamingDataset(local=d.eval_path, shuffle=False) if d.eval_path else self.dataset

    def _check(self, feats: torch.Tensor, where: str) -> torch.Tensor:
        want = (self.cfg.model.feature_dim, self.cfg.data.grid_size, self.cfg.data.grid_size)
        if tuple(feats.shape[1:]) != want:
            raise ValueError(f"{where}: column 'feats_dino' holds {tuple(feats.shape[1:])}, expected {want}")
        return feats

    def batch(self, step: int) -> torch.Tensor:
        for _ in range(2):  # a fresh epoch when the previous one is exhausted
            if self.iterator is None:
                self.iterator = iter(self.loader)
            try:
                b = next(self.iterator)
                break
            except StopIteration:
                self.iterator = None
        else:
            raise ValueError(f"data.path {self.cfg.data.path}: fewer samples than train.batch_size")
        feats = self._check(b["feats_dino"], str(self.cfg.data.path))
        if self.cfg.data.hflip and "feats_dino_flip" in b:
            flip = torch.rand(len(feats), generator=_generator(self.cfg.train.seed, 3, step)) < 0.5
            feats = torch.where(flip[:, None, None, None], b["feats_dino_flip"], feats)
        return feats

    def eval_batch(self) -> torch.Tensor:
        ds = self.eval_dataset
        n = min(self.cfg.data.eval_size, ds.num_samples)
        idx = range(n) if ds is not self.dataset else range(ds.num_samples - n, ds.num_samples)
        return self._check(_collate([ds[i] for i in idx])["feats_dino"], "evaluation shards")

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:  # streaming's own resumption (continues the sample stream)
        if state.get("loader"):
            self.loader.load_state_dict(state["loader"])

    def close(self) -> None:
        self.iterator = None
        self.lease.release(self.dataset)
        del self.loader, self.dataset, self.eval_dataset


def _evaluate(model: SemanticVAE, feats: torch.Tensor, autocast) -> dict:
    """Reconstruction of the fixed evaluation batch through the posterior mean."""
    model.eval()
    with torch.no_grad(), autocast():
        rec = model.decode(model.encode(feats).mean)
    model.train()
    return {"eval/feature_cos": feature_cosine(feats, rec).item(),
            "eval/mse": (rec.float() - feats.float()).pow(2).mean().item()}


def _build(cfg: SemVAETrainConfig, device: torch.device, state_path: Path):
    """(model, optimizer, LR schedule, the resumed state or None): seeded, and continued from ``state_path``
    when ``train.resume`` and it exists."""
    o, t, args = cfg.optim, cfg.train, cfg.model
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(t.seed)
        model = SemanticVAE(args).to(device)
    fused = o.fused if o.fused is not None else device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay, fused=fused)
    sched = LambdaLR(opt, lambda s: semvae_lr(s, cfg) / o.lr)
    if not (t.resume and state_path.is_file()):
        return model, opt, sched, None
    state = torch.load(state_path, map_location=device, weights_only=True)
    if state["model_args"] != asdict(args):
        raise ConfigError(f"{state_path} was saved for model {state['model_args']}, the config has "
                          f"{asdict(args)}: set train.output_dir elsewhere or train.resume=false")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return model, opt, sched, state


def build_source(cfg: SemVAETrainConfig, device: torch.device, image_source: Optional[Callable] = None) -> _Source:
    """The run's feature source; ``image_source(cfg, device)`` builds the ``images`` one."""
    if cfg.data.source == "images":
        if image_source is None:
            raise ConfigError("data.source=images needs the image feature source of sfd_scale.data "
                              "(sfd semvae passes it)")
        return image_source(cfg, device)
    return ShardFeatures(cfg) if cfg.data.source == "shards" else RandomFeatures(cfg)


def train_semvae(cfg: SemVAETrainConfig, image_source: Optional[Callable] = None) -> dict:
    """Train (or continue training) a SemVAE; returns the run summary (see ``semvae_summary_text``).
    ``image_source``: ``sfd_scale.data.semvae_images.ImageFeatures`` for ``data.source=images``."""
    validate_semvae(cfg)
    o, t, args = cfg.optim, cfg.train, cfg.model
    device = resolve_device(t.device)
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "semvae_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    model, opt, sched, state = _build(cfg, device, out / STATE_FILE)
    max_steps = o.total_steps if t.max_steps is None else t.max_steps
    step = start_step = state["step"] if state else 0
    first_loss, state_path = None, out / STATE_FILE
    source = build_source(cfg, device, image_source)
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")  # noqa: E731
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    history, metrics, last_loss, ckpt, logger = [], {}, None, None, None
    loss_sum, window, t_start, t_window = torch.zeros((), device=device), 0, time.time(), time.time()

    def save_state():
        with atomic_path(state_path) as tmp:
            torch.save({"step": step, "model_args": asdict(args), "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "data": source.state_dict()}, tmp)

    try:
        source.load_state_dict(state["data"] if state else {})
        eval_feats = source.eval_batch().to(device)
        logger = RunLogger(str(out), cfg.logging.wandb_mode, cfg.logging.project, cfg.logging.run_name,
                           asdict(cfg), max_steps, step, show_progress(cfg.logging.progress, rank=0))
        model.train()
        while step < max_steps:
            feats = source.batch(step).to(device, non_blocking=True)
            with amp():
                rec, posterior = model(feats, generator=_generator(t.seed, 2, step, device=device))
            terms = semvae_loss(feats, rec, posterior, o.kl_weight)
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            step += 1
            loss_sum += terms["total"].detach()
            window += 1
            evaluated = step == max_steps or (t.eval_every and step % t.eval_every == 0)
            metrics = _evaluate(model, eval_feats, amp) if evaluated else metrics
            if evaluated or step == start_step + 1 or (t.log_every and step % t.log_every == 0):
                last_loss = terms["total"].item()
                first_loss = last_loss if first_loss is None else first_loss
                history.append((step, last_loss))
                now = time.time()
                logger.log(step, {"loss": last_loss, "loss_avg": loss_sum.item() / window, "lr": lr,
                                  "steps/s": window / max(now - t_window, 1e-9),
                                  **{f"loss/{k}": v.item() for k, v in terms.items() if k != "total"},
                                  **(metrics if evaluated else {})})
                loss_sum.zero_()
                window, t_window = 0, now
            if evaluated:
                logger.write(f"step {step}: held-out feature cosine similarity {metrics['eval/feature_cos']:.4f}, "
                             f"mse {metrics['eval/mse']:.4g}")
            if t.save_every and step % t.save_every == 0 and step < max_steps:
                save_semvae(out / f"semvae_step_{step:07d}.safetensors", model, args,
                            {"step": step, "loss": last_loss, **metrics})
                save_state()
            logger.advance()
        if step > start_step or not (out / FINAL_FILE).is_file():
            metrics = metrics or _evaluate(model, eval_feats, amp)
            extra = {"step": step, "loss": last_loss, **metrics}
            save_semvae(out / f"semvae_step_{step:07d}.safetensors", model, args, extra)
            ckpt = save_semvae(out / FINAL_FILE, model, args, extra)
            save_state()
    finally:
        if logger is not None:
            logger.close()
        source.close()
    return {"steps": step, "steps_this_run": step - start_step, "seconds": time.time() - t_start,
            "first_loss": first_loss, "last_loss": last_loss, "feature_cos": metrics.get("eval/feature_cos"),
            "params_M": params_m, "checkpoint": str(ckpt or out / FINAL_FILE), "loss_history": history}


def semvae_summary_text(summary: dict, cfg: SemVAETrainConfig) -> str:
    """One paragraph for the end of a run."""
    m = cfg.model
    loss = (f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
            if summary["first_loss"] is not None else "no new steps")
    cos = "n/a" if summary["feature_cos"] is None else f"{summary['feature_cos']:.4f}"
    return (f"Trained the SemVAE ({summary['params_M']:.2f}M params: width {m.width}, depth {m.depth}, "
            f"{m.feature_dim} -> {m.latent_channels} channels) on {cfg.data.source} features for "
            f"{summary['steps_this_run']} steps (total {summary['steps']}) in {summary['seconds']:.1f}s; {loss}; "
            f"held-out feature cosine similarity {cos}. Checkpoint: {summary['checkpoint']}.")
