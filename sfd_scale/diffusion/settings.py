"""The diffusion settings as plain dataclasses: the latent layout (``SFDSpec``), the objective's, the
guidance's and the sampler's settings, and the names each accepts.

Torch-free on purpose: the run config (``sfd_scale/config.py``) inherits these classes, and a config is read
and checked (a typo reported, ``--print-config``) before torch is imported. The SFD math that uses them lives
in ``sfd.py`` (time mapping, path, target, masks, losses), ``guidance.py`` and ``sampling.py``, which
re-export these names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:
    import torch

REPA_MODES = ("cos", "mse", "cos_mse")
INTERVAL_MODES = ("both", "tex", "sem")


@dataclass(frozen=True)


class SFDSpec:
    """Channel layout and asynchrony of a composite latent.

    ``semantic_chans == 0`` or ``delta_t == 0`` describes a synchronous model (plain LightningDiT, or the
    dt = 0 baseline that denoises both parts together): one time per sample, clock [0, 1], no phase masks.
    The semantic loss weight still applies to the semantic channels of a dt = 0 model.

    ``interval_mode`` is part of the model's description, as in the official constructor
    (``semfirst_infer_interval_mode``): which parts the guidance interval holds back at inference ('both',
    'tex' or 'sem'; ``diffusion/guidance.py``). It travels with the spec so that guided sampling of a model
    uses the model's own mode unless the guidance settings name another.
    """

    texture_chans: int
    semantic_chans: int = 0
    delta_t: float = 0.0
    interval_mode: str = "both"

    def __post_init__(self):
        if self.texture_chans <= 0:
            raise ValueError(f"sfd.texture_chans must be > 0, got {self.texture_chans}")
        if self.semantic_chans < 0:
            raise ValueError(f"sfd.semantic_chans must be >= 0, got {self.semantic_chans}")
        if self.semantic_chans > 0 and not (0.0 <= self.delta_t < 1.0):
            raise ValueError(f"sfd.delta_t must lie in the open interval (0, 1) (or be exactly 0 for a synchronous "
                             f"baseline), got {self.delta_t}")
        if self.semantic_chans == 0 and self.delta_t != 0.0:
            raise ValueError(f"sfd.delta_t={self.delta_t} needs sfd.semantic_chans > 0 (no semantic part to run ahead)")
        if self.interval_mode not in INTERVAL_MODES:
            raise ValueError(f"sfd.interval_mode must be one of {INTERVAL_MODES}, got {self.interval_mode!r}")

    @property
    def channels(self) -> int:
        return self.texture_chans + self.semantic_chans

    @property
    def is_async(self) -> bool:
        return self.semantic_chans > 0 and self.delta_t > 0

    @property
    def t_end(self) -> float:
        """End of the sampling clock: 1 + dt for SFD, 1 for a plain model."""
        return 1.0 + self.delta_t if self.is_async else 1.0

    def check_channels(self, in_channels: int, what: str = "model.in_channels") -> None:
        if in_channels != self.channels:
            raise ValueError(
                f"channel split does not add up: sfd.texture_chans ({self.texture_chans}) + "
                f"sfd.semantic_chans ({self.semantic_chans}) = {self.channels}, but {what} = {in_channels}")

    def split(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(texture, semantic) parts of a (B, C, ...) tensor."""
        return x[:, : self.texture_chans], x[:, self.texture_chans:]


# ----------------------------------------------------------------------------------------------- objective
@dataclass
class ObjectiveConfig:
    """Loss settings (official Transport arguments; the run config's ``sfd`` section inherits them)."""

    semantic_weight: float = 2.0
    use_cosine_loss: bool = True
    use_lognorm: bool = True
    repa_weight: float = 1.0
    repa_mode: str = "cos"

    def __post_init__(self):
        if self.repa_mode not in REPA_MODES:
            raise ValueError(f"sfd.repa_mode must be one of {REPA_MODES}, got {self.repa_mode!r}")


# ----------------------------------------------------------------------------------------------- guidance
KINDS = ("none", "cfg", "autoguidance")


@dataclass


class GuidanceConfig:
    """Guidance settings under the official argument names (``forward_with_cfg`` / ``forward_with_autoguidance``;
    the run config's ``sample`` section inherits them)."""
    guidance: str = "none"          # none | cfg | autoguidance
    cfg_scale: float = 1.0          # used only when > 1, like the official code (autoguidance too)
    cfg_scale_tex: Optional[float] = None  # per-part scales, default ``cfg_scale``
    cfg_scale_sem: Optional[float] = None
    cfg_interval_start: Optional[float] = None  # None = no interval (official cfg_interval=False)
    interval_mode: Optional[str] = None  # which parts the interval holds back (both | tex | sem); None: the
                                         # model's own (SFDSpec.interval_mode)

    def __post_init__(self):
        if self.guidance not in KINDS:
            raise ValueError(f"sample.guidance must be one of {KINDS}, got {self.guidance!r}")
        if self.interval_mode is not None and self.interval_mode not in INTERVAL_MODES:
            raise ValueError(f"sample.interval_mode must be one of {INTERVAL_MODES}, got {self.interval_mode!r}")

    @property
    def active(self) -> bool:
        return self.guidance != "none" and self.cfg_scale > 1.0


# ----------------------------------------------------------------------------------------------- sampler
FIXED_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


@dataclass


class SamplerConfig:
    """ODE solver settings (the run config's ``sample`` section inherits them)."""
    method: str = "dopri5"
    num_steps: int = 250     # grid points (fixed-step solvers take num_steps - 1 steps)
    atol: float = 1e-6
    rtol: float = 1e-3
    timestep_shift: float = 0.0

    def __post_init__(self):
        if self.method not in FIXED_METHODS + ADAPTIVE_METHODS:
            raise ValueError(f"sample.method must be one of {FIXED_METHODS + ADAPTIVE_METHODS}, got {self.method!r}")
        if self.num_steps < 2:
            raise ValueError(f"sample.num_steps counts grid points and must be >= 2, got {self.num_steps}")
        if self.timestep_shift < 0:
            raise ValueError(f"sample.timestep_shift must be >= 0, got {self.timestep_shift}")
