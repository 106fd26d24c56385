"""THE Semantic-First Diffusion math: the one home of time mapping, path, target, phase masks and losses.

Training (``SFDObjective``), sampling (``sampling.py``), benchmarks and tests import from here; nothing
else in the project re-derives these formulas. Conventions follow the official code (see
``shared/golden/SFD_ALGORITHM.md``):

* t in [0, 1], t = 0 is pure noise, t = 1 is data; linear path x_t = t*x1 + (1-t)*x0; velocity target
  x1 - x0 (never masked, even where a part's time is clamped).
* Composite latent: texture channels first, semantic channels last.
* Asynchronous clock tau in [0, 1 + dt]: t_sem = min(tau, 1), t_tex = max(tau - dt, 0), computed in
  float32 from the *unclamped* tau (quirk kept for parity).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

# the layout and settings classes live in the torch-free settings.py (a config is checked before torch is
# imported); re-exported here under their old names
from .settings import INTERVAL_MODES, REPA_MODES, ObjectiveConfig, SFDSpec  # noqa: F401

Time = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]

# the loss terms' batch means the objective gives for the logs (``SFDObjective.term_means``), in log order
LOGGED_TERMS = ("loss_texture", "loss_semantic", "loss_cos", "loss_repa")


# ----------------------------------------------------------------------------------------------- time
def clock_to_times(tau: torch.Tensor, delta_t: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global clock tau -> (t_tex, t_sem). Float32 arithmetic, t_tex from the unclamped tau."""
    return torch.clamp(tau - delta_t, min=0.0), torch.clamp(tau, max=1.0)


def base_to_clock(t_base: torch.Tensor, delta_t: float) -> torch.Tensor:
    """Training stretch: a base time in [0, 1] covers the whole clock [0, 1 + dt]."""
    return t_base * (1.0 + delta_t)


def model_time(spec: SFDSpec, tau: torch.Tensor) -> Time:
    """What the network receives as ``t`` at clock value tau: (t_tex, t_sem) for SFD, tau otherwise."""
    return clock_to_times(tau, spec.delta_t) if spec.is_async else tau


def sample_base_time(batch: int, *, lognorm: bool, generator: Optional[torch.Generator] = None,
                     device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """One base time per sample: sigmoid(N(0,1)) (logit-normal) or U(0,1).

    The official code draws the normal with numpy in float64 and casts to float32; we draw the same
    distribution with a torch generator (reproducible, resumable) in float64, then cast.
    """
    if lognorm:
        return base_time_from_draws(torch.randn(batch, generator=generator, dtype=torch.float64, device=device),
                                    lognorm=True)
    return base_time_from_draws(torch.rand(batch, generator=generator, dtype=torch.float64, device=device),
                                lognorm=False)


def base_time_from_draws(draw: torch.Tensor, *, lognorm: bool) -> torch.Tensor:
    """The base-time transform of given draws (float64 in, float32 out): sigmoid of a standard normal
    (logit-normal), or a U(0, 1) uniform as it is. ``sample_base_time`` draws with a generator; the
    trainer's counter-based draws (``keyed_noise.py``) come here with their own."""
    return (torch.sigmoid(draw) if lognorm else draw).float()


# ----------------------------------------------------------------------------------------------- path
def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def interpolate(spec: SFDSpec, x0: torch.Tensor, x1: torch.Tensor, t: Time) -> torch.Tensor:
    """Linear path per part: x_t = t*x1 + (1-t)*x0 with the texture / semantic time of each part."""
    if not spec.is_async:
        tt = _bcast(t, x1)
        return tt * x1 + (1 - tt) * x0
    t_tex, t_sem = t
    x0_tex, x0_sem = spec.split(x0)
    x1_tex, x1_sem = spec.split(x1)
    tt, ts = _bcast(t_tex, x1), _bcast(t_sem, x1)
    return torch.cat([tt * x1_tex + (1 - tt) * x0_tex, ts * x1_sem + (1 - ts) * x0_sem], dim=1)


def velocity_target(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """u = dx_t/dt = x1 - x0 on every channel (no masking where a time is clamped)."""
    return x1 - x0


def phase_mask(spec: SFDSpec, v: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Three-phase drift: texture frozen while tau < dt, semantics frozen once tau > 1.

    Only element 0 of tau is read (one clock for the batch); comparisons are float32 like the official
    ``tau >= dt`` / ``tau <= 1`` tests, so a float32 grid point 0.29999998 still counts as phase I.
    """
    if not spec.is_async:
        return v
    tau0 = tau.reshape(-1)[:1].float()
    tex_on = bool((tau0 >= spec.delta_t).item())
    sem_on = bool((tau0 <= 1.0).item())
    if tex_on and sem_on:
        return v
    v = v.clone()
    if not tex_on:
        v[:, : spec.texture_chans] = 0
    if not sem_on:
        v[:, spec.texture_chans:] = 0
    return v


def clock_grid(spec: SFDSpec, num_points: int, timestep_shift: float = 0.0) -> torch.Tensor:
    """Solver grid on [0, t_end]: ``num_points`` float32 points (so num_points - 1 fixed steps).

    timestep_shift s > 0 maps every point tau to t_end * g(tau / t_end), g(u) = s*u / (1 + (s-1)*u);
    s < 1 crowds points toward the noise end.
    """
    if num_points < 2:
        raise ValueError(f"sample.num_steps counts grid points and must be >= 2, got {num_points}")
    grid = torch.linspace(0.0, spec.t_end, num_points)
    if timestep_shift > 0:
        u = grid / spec.t_end
        grid = spec.t_end * (timestep_shift * u / (1 + (timestep_shift - 1) * u))
    return grid


# ----------------------------------------------------------------------------------------------- losses
def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.dim())))


def weighted_mse(spec: SFDSpec, pred: torch.Tensor, target: torch.Tensor, semantic_weight: float) -> torch.Tensor:
    """Per-sample mean over C*H*W of (pred - target)^2 with semantic channels times w.

    The divisor is the element count, not the sum of weights (official behaviour).
    """
    sq = (pred - target) ** 2
    if spec.semantic_chans > 0 and semantic_weight != 1.0:
        weight = torch.ones(sq.shape[1], dtype=sq.dtype, device=sq.device)
        weight[spec.texture_chans:] = semantic_weight
        sq = sq * weight.reshape(1, -1, *([1] * (sq.dim() - 2)))
    return mean_flat(sq)


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over positions of 1 - cos(pred, target) over all channels jointly."""
    return mean_flat(1 - F.cosine_similarity(pred, target, dim=1, eps=1e-8))


def repa_tokens(features: torch.Tensor) -> torch.Tensor:
    """(B, d_z, h, w) stored REPA target -> (B, h*w, d_z), row-major tokens like the patch embed."""
    if features.dim() == 4:
        return features.flatten(2).transpose(1, 2)
    return features


def repa_loss(projection: torch.Tensor, features: torch.Tensor, mode: str = "cos") -> torch.Tensor:
    """Per-sample REPA alignment loss between projector output (B, T, d_z) and targets."""
    feats = repa_tokens(features).to(projection.dtype)
    if feats.shape != projection.shape:
        raise ValueError(f"REPA target shape {tuple(feats.shape)} does not match projector output "
                         f"{tuple(projection.shape)} (tokens, feature dim)")
    if mode not in REPA_MODES:
        raise ValueError(f"sfd.repa_mode must be one of {REPA_MODES}, got {mode!r}")
    cos = mean_flat(1 - F.cosine_similarity(feats, projection, dim=-1))
    if mode == "cos":
        return cos
    mse = mean_flat((feats - projection) ** 2)
    return mse if mode == "mse" else 0.5 * (cos + mse)


# ----------------------------------------------------------------------------------------------- objective
class SFDObjective:
    """Asynchronous semantic-first flow-matching loss, as ``Transport.training_losses`` computes it."""

    def __init__(self, spec: SFDSpec, config: ObjectiveConfig = ObjectiveConfig()):
        self.spec = spec
        self.config = config

    def times(self, t_base: torch.Tensor) -> Time:
        """Network times for a base time: stretched pair for SFD, the base time for a plain model."""
        return model_time(self.spec, base_to_clock(t_base, self.spec.delta_t)) if self.spec.is_async else t_base

    def prepare(self, x1: torch.Tensor, *, t_base: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> dict:
        """The random draw and the network input of one batch: t_base, t (model time), x0, xt, ut."""
        self.spec.check_channels(x1.shape[1], "data channels")
        if t_base is None:
            t_base = sample_base_time(x1.shape[0], lognorm=self.config.use_lognorm, generator=generator,
                                      device=x1.device)
        if x0 is None:
            x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        t = self.times(t_base)
        return {"t_base": t_base, "t": t, "x0": x0, "xt": interpolate(self.spec, x0, x1, t),
                "ut": velocity_target(x0, x1)}

    def losses(self, pred: torch.Tensor, ut: torch.Tensor, projection: Optional[torch.Tensor] = None,
               repa_target: Optional[torch.Tensor] = None) -> dict:
        """Per-sample loss terms of a prediction, the batch ``total`` (what train.py back-propagates) and the
        terms' batch means for the logs (``term_means``: ``loss_texture``, ...)."""
        terms = {"loss": weighted_mse(self.spec, pred.float(), ut.float(), self.config.semantic_weight)}
        total = terms["loss"].mean()
        if self.config.use_cosine_loss:
            terms["cos_loss"] = cosine_loss(pred.float(), ut.float())
            total = total + terms["cos_loss"].mean()
        if repa_target is not None:
            if projection is None:
                raise ValueError("a REPA target was given but the model returned no projection "
                                 "(model.use_repa is off or the model is in eval mode)")
            terms["repa_loss"] = self.repa_term(projection, repa_target)
            total = total + terms["repa_loss"].mean()
        terms["total"] = total
        return terms | self.term_means(pred, ut, terms)

    def logged_names(self, repa: bool) -> Tuple[str, ...]:
        """The names ``term_means`` gives (the same on every rank and pipeline stage of a run)."""
        present = {"loss_texture": True, "loss_semantic": self.spec.semantic_chans > 0,
                   "loss_cos": self.config.use_cosine_loss, "loss_repa": repa}
        return tuple(name for name in LOGGED_TERMS if present[name])

    @torch.no_grad()
    def term_means(self, pred: torch.Tensor, ut: torch.Tensor, terms: dict) -> dict:
        """Batch means of each loss term, for the logs: 0-dim float32 device tensors, outside the graph.

        ``loss_texture`` / ``loss_semantic``: the plain MSE of each part (mean over its elements, no weight),
        so that ``terms['loss'].mean() = (Ct * loss_texture + w * Cs * loss_semantic) / (Ct + Cs)`` (weighted_mse
        divides by the element count); ``loss_cos`` and ``loss_repa`` (weighted by ``repa_weight``) are the
        terms as added to ``total``: total = that mean + loss_cos + loss_repa. A plain model (no semantic part)
        has ``loss_texture`` = its whole MSE."""
        texture, semantic = self.spec.split((pred.detach().float() - ut.detach().float()) ** 2)
        means = {"loss_texture": texture.mean()}
        if self.spec.semantic_chans > 0:
            means["loss_semantic"] = semantic.mean()
        for name, key in (("loss_cos", "cos_loss"), ("loss_repa", "repa_loss")):
            if key in terms:
                means[name] = terms[key].detach().mean()
        return means

    def repa_term(self, projection: torch.Tensor, repa_target: torch.Tensor) -> torch.Tensor:
        """Per-sample weighted REPA loss (also used alone by a pipeline stage that owns the projector)."""
        return self.config.repa_weight * repa_loss(projection.float(), repa_target.float(), self.config.repa_mode)

    def __call__(self, model: Callable, batch) -> dict:
        """The objective hook every engine calls: ``loss_terms`` of one ``micro_batch.MicroBatch``, its draw
        pinned (``batch.x1``, ``.y``, ``.t_base``, ``.x0``, ``.repa_target``); engines back-propagate ``total``."""
        return self.loss_terms(model, batch.x1, batch.y, t_base=batch.t_base, x0=batch.x0,
                               repa_target=batch.repa_target)

    def loss_terms(self, model: Callable, x1: torch.Tensor, y: torch.Tensor, *,
                   t_base: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
                   repa_target: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> dict:
        """All per-sample terms plus ``total``. Pass ``t_base`` / ``x0`` to pin the random draw.

        ``model(x, t, y)`` must return the velocity, or ``(velocity, repa_projection)`` when
        ``repa_target`` is given.
        """
        batch = self.prepare(x1, t_base=t_base, x0=x0, generator=generator)
        out = model(batch["xt"], batch["t"], y)
        pred, proj = (out if isinstance(out, tuple) else (out, None))
        terms = {k: batch[k] for k in ("t_base", "xt", "ut")} | {"pred": pred}
        if self.spec.is_async:
            terms["t_tex"], terms["t_sem"] = batch["t"]
        return terms | self.losses(pred, batch["ut"], proj, repa_target)
