"""Official SFD argument names -> our objective / sampler / guidance configs.

The official code spreads these over ``create_transport(...)``, ``Sampler.sample_ode_semantic_first(...)``
and ``forward_with_cfg`` / ``forward_with_autoguidance``; golden sets and converted YAMLs use those
names, so the translation lives in one place.
"""
from __future__ import annotations

from typing import Optional

from .guidance import GuidanceConfig
from .sampling import SamplerConfig
from .sfd import ObjectiveConfig


def objective_from_official(path_type: str = "Linear", prediction: str = "velocity", loss_weight=None,
                            train_eps=None, sample_eps=None, use_cosine_loss: bool = False,
                            use_lognorm: bool = False, semantic_weight: float = 1.0, repa_weight: float = 1.0,
                            repa_mode: str = "cos", **ignored) -> ObjectiveConfig:
    """``create_transport`` arguments -> ObjectiveConfig. Only the SFD setting (linear path, velocity
    prediction, no loss weighting, eps 0) is implemented; anything else is refused by name."""
    unsupported = {"path_type": (path_type, "Linear"), "prediction": (prediction, "velocity"),
                   "loss_weight": (loss_weight, None)}
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise ValueError(f"transport {key}={value!r} is not supported (only {supported!r}, the SFD setting)")
    for key, value in (("train_eps", train_eps), ("sample_eps", sample_eps)):
        if value not in (None, 0, 0.0):
            raise ValueError(f"transport {key}={value!r} is not supported (velocity + linear path uses eps 0)")
    return ObjectiveConfig(semantic_weight=semantic_weight, use_cosine_loss=use_cosine_loss,
                           use_lognorm=use_lognorm, repa_weight=repa_weight, repa_mode=repa_mode)


def official_transport_kwargs(objective: ObjectiveConfig, semantic_chans: int, delta_t: float) -> dict:
    """The official ``create_transport(...)`` keyword arguments of an objective (the SFD setting; inverse of
    ``objective_from_official`` plus the channel split the official transport also takes)."""
    return dict(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None,
                use_cosine_loss=objective.use_cosine_loss, use_lognorm=objective.use_lognorm,
                semantic_weight=objective.semantic_weight, semantic_chans=semantic_chans, semfirst_delta_t=delta_t,
                repa_weight=objective.repa_weight, repa_mode=objective.repa_mode)


def sampler_from_official(sampling_method: str = "dopri5", num_steps: int = 250, atol: float = 1e-6,
                          rtol: float = 1e-3, timestep_shift: float = 0.0, **ignored) -> SamplerConfig:
    return SamplerConfig(method=sampling_method, num_steps=num_steps, atol=atol, rtol=rtol,
                         timestep_shift=timestep_shift)


def guidance_from_official(guidance: str = "cfg", cfg_scale: float = 1.0, cfg_interval: bool = False,
                           cfg_interval_start: float = 0.0, cfg_scale_sem: Optional[float] = None,
                           cfg_scale_tex: Optional[float] = None, semfirst_infer_interval_mode: Optional[str] = None,
                           **ignored) -> GuidanceConfig:
    """``forward_with_cfg`` / ``forward_with_autoguidance`` arguments -> GuidanceConfig.

    ``guidance`` is 'none', 'cfg' or 'autoguidance' (which official method the caller used); the
    interval start only counts when ``cfg_interval`` is on, exactly as in the official methods. The interval
    mode is the model's (``sfd_spec_from_official`` reads it from the constructor arguments); pass
    ``semfirst_infer_interval_mode`` only to sample with another one.
    """
    return GuidanceConfig(guidance=guidance, cfg_scale=cfg_scale, cfg_scale_tex=cfg_scale_tex,
                          cfg_scale_sem=cfg_scale_sem, cfg_interval_start=cfg_interval_start if cfg_interval else None,
                          interval_mode=semfirst_infer_interval_mode)
