"""Unit tests of the SFD math beyond the golden set: edges of the clock, masks, grid, losses."""
import pytest
import torch

from sfd_scale.diffusion.sfd import (ObjectiveConfig, SFDObjective, SFDSpec, base_to_clock, clock_grid,
                                     clock_to_times, cosine_loss, interpolate, phase_mask, sample_base_time,
                                     weighted_mse)

SPEC = SFDSpec(texture_chans=4, semantic_chans=2, delta_t=0.3)


def test_clock_to_times_bent_line():
    tau = torch.tensor([0.0, 0.15, 0.3, 0.8, 1.0, 1.15, 1.3])
    t_tex, t_sem = clock_to_times(tau, 0.3)
    assert torch.allclose(t_sem, torch.tensor([0.0, 0.15, 0.3, 0.8, 1.0, 1.0, 1.0]))
    assert torch.allclose(t_tex, torch.tensor([0.0, 0.0, 0.0, 0.5, 0.7, 0.85, 1.0]), atol=1e-7)
    inside = (tau >= 0.3) & (tau <= 1.0)
    assert torch.allclose((t_sem - t_tex)[inside], torch.full_like(tau[inside], 0.3), atol=1e-6)


def test_training_stretch_covers_clock():
    assert torch.allclose(base_to_clock(torch.tensor([0.0, 1.0]), 0.3), torch.tensor([0.0, 1.3]))


def test_phase_mask_three_phases():
    v = torch.ones(2, 6, 2, 2)
    phase1 = phase_mask(SPEC, v, torch.full((2,), 0.1))
    assert phase1[:, :4].abs().sum() == 0 and phase1[:, 4:].eq(1).all()
    assert phase_mask(SPEC, v, torch.full((2,), 0.5)).eq(1).all()
    phase3 = phase_mask(SPEC, v, torch.full((2,), 1.2))
    assert phase3[:, 4:].abs().sum() == 0 and phase3[:, :4].eq(1).all()
    # float32 grid point just below dt is still phase I (official float32 comparison)
    below = torch.tensor([0.29999998], dtype=torch.float32)
    assert phase_mask(SPEC, torch.ones(1, 6, 1, 1), below)[:, :4].abs().sum() == 0


def test_grid_points_and_shift():
    grid = clock_grid(SPEC, 14)
    assert grid.dtype == torch.float32 and len(grid) == 14 and grid[-1] == pytest.approx(1.3)
    assert grid[3].item() < 0.3  # the documented 0.29999998 edge case
    shifted = clock_grid(SPEC, 8, timestep_shift=0.3)
    assert shifted[0] == 0 and shifted[-1] == pytest.approx(1.3)
    assert (shifted[1:4] < torch.linspace(0, 1.3, 8)[1:4]).all()  # s < 1: points crowd at the noise end
    with pytest.raises(ValueError, match="num_steps"):
        clock_grid(SPEC, 1)


def test_interpolate_per_part_and_plain():
    x0, x1 = torch.zeros(1, 6, 1, 1), torch.ones(1, 6, 1, 1)
    xt = interpolate(SPEC, x0, x1, (torch.tensor([0.2]), torch.tensor([0.5])))
    assert torch.allclose(xt[0, :4, 0, 0], torch.full((4,), 0.2))
    assert torch.allclose(xt[0, 4:, 0, 0], torch.full((2,), 0.5))
    plain = SFDSpec(texture_chans=6)
    assert torch.allclose(interpolate(plain, x0, x1, torch.tensor([0.7])), torch.full((1, 6, 1, 1), 0.7))


def test_weighted_mse_divides_by_element_count():
    pred, target = torch.zeros(1, 6, 1, 1), torch.ones(1, 6, 1, 1)
    assert weighted_mse(SPEC, pred, target, 2.0).item() == pytest.approx((4 + 2 * 2) / 6)


def test_cosine_loss_is_joint_over_channels():
    a = torch.tensor([[[[1.0]], [[0.0]]]])
    assert cosine_loss(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert cosine_loss(a, torch.tensor([[[[0.0]], [[1.0]]]])).item() == pytest.approx(1.0)


def test_lognormal_base_time_is_reproducible_and_centered():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    t1 = sample_base_time(20000, lognorm=True, generator=g1)
    assert torch.equal(t1, sample_base_time(20000, lognorm=True, generator=g2))
    assert t1.dtype == torch.float32 and 0 < t1.min() and t1.max() < 1
    assert t1.median().item() == pytest.approx(0.5, abs=0.02)


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="delta_t"):
        SFDSpec(4, 2, 1.0)
    with pytest.raises(ValueError, match="delta_t"):
        SFDSpec(4, 2, -0.1)
    synchronous = SFDSpec(4, 2, 0.0)  # the dt = 0 baseline: semantic channels, one shared time
    assert not synchronous.is_async and synchronous.t_end == 1.0
    with pytest.raises(ValueError, match="semantic_chans"):
        SFDSpec(4, 0, 0.3)
    with pytest.raises(ValueError, match="does not add up"):
        SPEC.check_channels(7)


def test_objective_targets_are_not_masked():
    """Where t_tex is clamped at 0 the texture target still counts (official quirk)."""
    objective = SFDObjective(SPEC, ObjectiveConfig(semantic_weight=1.0, use_cosine_loss=False))
    x1, x0 = torch.randn(1, 6, 2, 2), torch.randn(1, 6, 2, 2)
    terms = objective.loss_terms(lambda x, t, y: torch.zeros_like(x), x1, torch.zeros(1, dtype=torch.long),
                                 t_base=torch.tensor([0.1]), x0=x0)
    assert terms["t_tex"].item() == 0.0
    assert terms["loss"].item() == pytest.approx(((x1 - x0) ** 2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("cosine, repa", [(True, True), (False, False)])
def test_term_means_add_up_to_the_total(cosine, repa):
    """The logged means (``term_means``) are the parts of ``total``: texture and semantic MSE by the element
    count formula of ``weighted_mse``, the cosine and (weighted) REPA terms as added."""
    config = ObjectiveConfig(semantic_weight=3.0, use_cosine_loss=cosine, repa_weight=0.5)
    objective = SFDObjective(SPEC, config)
    g = torch.Generator().manual_seed(0)
    x1, proj, feats = torch.randn(3, 6, 4, 4, generator=g), torch.randn(3, 16, 8, generator=g), torch.randn(3, 8, 4, 4)

    def model(x, t, y):
        return (x * 0.5, proj) if repa else x * 0.5

    terms = objective.loss_terms(model, x1, torch.zeros(3, dtype=torch.long), generator=g,
                                 repa_target=feats if repa else None)
    names = objective.logged_names(repa=repa)
    assert names == ("loss_texture", "loss_semantic") + (("loss_cos", "loss_repa") if repa else ())
    assert all(terms[k].dim() == 0 and not terms[k].requires_grad for k in names)
    sq = (terms["pred"] - terms["ut"]) ** 2
    assert terms["loss_texture"].item() == pytest.approx(sq[:, :4].mean().item(), rel=1e-6)
    mse = (4 * terms["loss_texture"] + 3.0 * 2 * terms["loss_semantic"]) / 6
    assert terms["loss"].mean().item() == pytest.approx(mse.item(), rel=1e-6)
    parts = mse + sum(terms[k] for k in ("loss_cos", "loss_repa") if k in names)
    assert terms["total"].item() == pytest.approx(parts.item(), rel=1e-6)
    plain = SFDObjective(SFDSpec(texture_chans=6), ObjectiveConfig(use_cosine_loss=False))
    assert plain.logged_names(repa=False) == ("loss_texture",)
