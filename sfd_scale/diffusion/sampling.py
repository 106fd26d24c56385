"""ODE sampling over the three SFD phases with torchdiffeq, plus guidance and FID label helpers.

``Sampler(model, spec, SamplerConfig(...), GuidanceConfig(...), guide=...).sample(z, y)`` integrates
dx/dtau = mask(v(x, t(tau))) from tau = 0 (noise) to t_end = 1 + dt (data) and returns the final state
with all channels (drop the semantic ones with ``spec.split`` before decoding). The drift, grid and masks
come from ``sfd.py``; this module only wires model, guidance and solver.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torchdiffeq import odeint

from .guidance import GuidanceConfig, autoguidance_velocity, cfg_velocity
from .settings import ADAPTIVE_METHODS, FIXED_METHODS, SamplerConfig  # noqa: F401 (re-exported: declared in settings.py)
from .sfd import SFDSpec, clock_grid, model_time, phase_mask


def integrate(velocity: Callable, z: torch.Tensor, spec: SFDSpec, config: SamplerConfig) -> torch.Tensor:
    """Trajectory (num_steps, *z.shape) of the masked drift; ``velocity(x, t)`` gets the model time."""
    grid = clock_grid(spec, config.num_steps, config.timestep_shift).to(z.device)

    def drift(tau: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tau_b = torch.ones(x.shape[0], device=x.device) * tau
        return phase_mask(spec, velocity(x, model_time(spec, tau_b)), tau_b)

    # Tolerances as one-element lists, like the official ODE wrapper: torchdiffeq then forms the error
    # tolerance from a float32 tensor instead of a Python float, which changes adaptive step sizes by an
    # ulp and, through the phase switches, the dopri5 result by up to ~1e-2. Lists keep parity.
    return odeint(drift, z, grid, method=config.method, atol=[config.atol], rtol=[config.rtol])


class Sampler:
    """Deterministic sampler: same model, noise, labels and config give the same latents."""

    def __init__(self, model: Callable, spec: SFDSpec, config: SamplerConfig = SamplerConfig(),
                 guidance: GuidanceConfig = GuidanceConfig(), guide: Optional[Callable] = None,
                 null_class: int = 1000):
        if guidance.active and guidance.guidance == "autoguidance" and guide is None:
            raise ValueError("sample.guidance='autoguidance' needs a guide model (sample.guide_checkpoint)")
        self.model, self.spec, self.config = model, spec, config
        self.guidance, self.guide, self.null_class = guidance, guide, null_class

    def velocity(self, y: torch.Tensor) -> Callable:
        g = self.guidance
        if not g.active:
            return lambda x, t: self.model(x, t, y)
        if g.guidance == "cfg":
            return lambda x, t: cfg_velocity(self.model, self.spec, x, t, y, g)
        return lambda x, t: autoguidance_velocity(self.model, self.guide, self.spec, x, t, y, g)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, y: torch.Tensor, return_trajectory: bool = False) -> torch.Tensor:
        """Final latents (B, C, H, W) at t_end from initial noise ``z`` and class labels ``y``."""
        self.spec.check_channels(z.shape[1], "noise channels")
        b = z.shape[0]
        if self.guidance.active and self.guidance.guidance == "cfg":
            z = torch.cat([z, z], dim=0)
            y = torch.cat([y, torch.full_like(y, self.null_class)], dim=0)
        traj = integrate(self.velocity(y), z, self.spec, self.config)[:, :b]
        return traj if return_trajectory else traj[-1]


def balanced_labels(global_index: torch.Tensor, fid_num: int, num_classes: int,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Class labels for FID runs: image k < fid_num gets class k // (fid_num // num_classes) (the
    remainder cycles 0, 1, 2, ...); images beyond fid_num get random labels. Indexed by the global image
    index so files and labels correspond whatever the world size."""
    per_class = fid_num // num_classes
    idx = global_index.long()
    full = per_class * num_classes
    labels = torch.where(idx < full, idx // max(per_class, 1), (idx - full) % num_classes)
    rand = torch.randint(0, num_classes, idx.shape, generator=generator)
    return torch.where(idx < fid_num, labels, rand)
