"""Classifier-free guidance and autoguidance for (SFD) velocity models, as the official code applies them.

Per part (texture / semantic): v = v_weak + s_part * (v_strong - v_weak), where (strong, weak) is
(conditional, unconditional) for CFG and (main model, guide model) for autoguidance. The guidance
interval keeps the strong (unguided) value for a part whose time (element 0 only) is below
``cfg_interval_start``; the interval mode says which parts obey that rule ('both', 'tex' or 'sem'): the
model's own (``SFDSpec.interval_mode``, the official constructor's ``semfirst_infer_interval_mode``) unless
``GuidanceConfig.interval_mode`` names another.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .settings import KINDS, GuidanceConfig  # noqa: F401 (re-exported: declared in the torch-free settings.py)
from .sfd import SFDSpec, Time


def _below_start(t: torch.Tensor, start: Optional[float]) -> bool:
    return start is not None and bool((t.reshape(-1)[0] < start).item())


def combine(spec: SFDSpec, strong: torch.Tensor, weak: torch.Tensor, t: Time, g: GuidanceConfig) -> torch.Tensor:
    """Guided velocity from a strong and a weak prediction, part by part, with the interval rule."""
    if not spec.is_async:  # plain model: one part, one time
        return strong if _below_start(t, g.cfg_interval_start) else weak + g.cfg_scale * (strong - weak)
    t_tex, t_sem = t
    s_tex = g.cfg_scale if g.cfg_scale_tex is None else g.cfg_scale_tex
    s_sem = g.cfg_scale if g.cfg_scale_sem is None else g.cfg_scale_sem
    st_tex, st_sem = spec.split(strong)
    wk_tex, wk_sem = spec.split(weak)
    tex = wk_tex + s_tex * (st_tex - wk_tex)
    sem = wk_sem + s_sem * (st_sem - wk_sem)
    mode = spec.interval_mode if g.interval_mode is None else g.interval_mode
    if mode in ("both", "tex") and _below_start(t_tex, g.cfg_interval_start):
        tex = st_tex
    if mode in ("both", "sem") and _below_start(t_sem, g.cfg_interval_start):
        sem = st_sem
    return torch.cat([tex, sem], dim=1)


def _half(t: Time, n: int) -> Time:
    return (t[0][:n], t[1][:n]) if isinstance(t, (tuple, list)) else t[:n]


def cfg_velocity(model: Callable, spec: SFDSpec, x: torch.Tensor, t: Time, y: torch.Tensor,
                 g: GuidanceConfig) -> torch.Tensor:
    """Official ``forward_with_cfg``: batch [x_cond; x_uncond] with labels [y; null].

    Only the first half of ``x`` is used (duplicated), one forward on 2B rows, output [v_g; v_g].
    """
    b = x.shape[0] // 2
    half = x[:b]
    out = model(torch.cat([half, half], dim=0), t, y)
    guided = combine(spec, out[:b], out[b:], _half(t, b), g)
    return torch.cat([guided, guided], dim=0)


def autoguidance_velocity(model: Callable, guide: Callable, spec: SFDSpec, x: torch.Tensor, t: Time,
                          y: torch.Tensor, g: GuidanceConfig) -> torch.Tensor:
    """Official ``forward_with_autoguidance``: same x, t and conditional labels for both models."""
    return combine(spec, model(x, t, y), guide(x, t, y), t, g)
