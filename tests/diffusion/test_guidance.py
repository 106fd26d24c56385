"""Guidance rules beyond the golden cases: interval modes, plain models, FID labels, determinism."""
import pytest
import torch

from sfd_scale.diffusion.guidance import GuidanceConfig, autoguidance_velocity, cfg_velocity, combine
from sfd_scale.diffusion.sampling import Sampler, SamplerConfig, balanced_labels
from sfd_scale.diffusion.sfd import SFDSpec

SPEC = SFDSpec(texture_chans=4, semantic_chans=2, delta_t=0.3)
STRONG, WEAK = torch.full((1, 6, 1, 1), 3.0), torch.full((1, 6, 1, 1), 1.0)
T = (torch.tensor([0.2]), torch.tensor([0.5]))  # t_tex below 0.3, t_sem above


@pytest.mark.parametrize("mode,tex_guided,sem_guided", [("both", False, True), ("tex", False, True),
                                                        ("sem", True, True)])
def test_interval_modes(mode, tex_guided, sem_guided):
    out = combine(SPEC, STRONG, WEAK, T, GuidanceConfig("cfg", 2.0, cfg_interval_start=0.3, interval_mode=mode))
    assert out[0, 0].item() == (5.0 if tex_guided else 3.0)
    assert out[0, 4].item() == (5.0 if sem_guided else 3.0)


def test_interval_sem_mode_leaves_texture_guided_and_can_hold_semantics():
    t = (torch.tensor([0.2]), torch.tensor([0.25]))
    out = combine(SPEC, STRONG, WEAK, t, GuidanceConfig("cfg", 2.0, cfg_interval_start=0.3, interval_mode="sem"))
    assert out[0, 0].item() == 5.0 and out[0, 4].item() == 3.0


def test_per_part_scales_and_plain_model():
    out = combine(SPEC, STRONG, WEAK, T, GuidanceConfig("autoguidance", 1.5, cfg_scale_tex=1.25, cfg_scale_sem=2.0))
    assert out[0, 0].item() == pytest.approx(1 + 1.25 * 2) and out[0, 4].item() == pytest.approx(1 + 2.0 * 2)
    plain = SFDSpec(texture_chans=6)
    g = GuidanceConfig("cfg", 2.0, cfg_interval_start=0.3)
    assert combine(plain, STRONG, WEAK, torch.tensor([0.1]), g).eq(3.0).all()
    assert combine(plain, STRONG, WEAK, torch.tensor([0.5]), g).eq(5.0).all()


def test_cfg_ignores_second_half_and_duplicates_output():
    calls = []

    def model(x, t, y):
        calls.append((x.clone(), y.clone()))
        return x * (y.float().view(-1, 1, 1, 1) + 1)

    x = torch.cat([torch.ones(1, 6, 1, 1), torch.full((1, 6, 1, 1), 99.0)])
    out = cfg_velocity(model, SPEC, x, (torch.full((2,), 0.5), torch.full((2,), 0.8)), torch.tensor([1, 9]),
                       GuidanceConfig("cfg", 2.0))
    assert torch.equal(calls[0][0][1], calls[0][0][0])  # second half replaced by the first
    assert torch.equal(out[0], out[1]) and out[0, 0].item() == pytest.approx(10 + 2 * (2 - 10))


def test_autoguidance_needs_a_guide():
    with pytest.raises(ValueError, match="guide"):
        Sampler(lambda x, t, y: x, SPEC, SamplerConfig("euler", 4), GuidanceConfig("autoguidance", 1.5))
    out = autoguidance_velocity(lambda x, t, y: STRONG, lambda x, t, y: WEAK, SPEC, STRONG, T,
                                torch.zeros(1, dtype=torch.long), GuidanceConfig("autoguidance", 2.0))
    assert out.eq(5.0).all()


def test_bad_guidance_settings():
    with pytest.raises(ValueError, match="interval_mode"):
        GuidanceConfig("cfg", 2.0, interval_mode="texture")
    with pytest.raises(ValueError, match="guidance"):
        GuidanceConfig("classifier", 2.0)
    with pytest.raises(ValueError, match="method"):
        SamplerConfig("rk45")


def test_sampler_is_deterministic_and_freezes_phases():
    torch.manual_seed(0)
    weight = torch.randn(6, 6)

    def model(x, t, y):
        return torch.einsum("oc,bchw->bohw", weight, x).tanh()

    sampler = Sampler(model, SPEC, SamplerConfig("heun2", 12))
    z = torch.randn(3, 6, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(3, dtype=torch.long)
    traj = sampler.sample(z, y, return_trajectory=True)
    assert torch.equal(traj[-1], sampler.sample(z, y))
    grid = torch.linspace(0, 1.3, 12)
    phase1 = grid < 0.3
    assert torch.equal(traj[phase1][:, :, :4], z[:, :4].expand(int(phase1.sum()), -1, -1, -1, -1))
    after = (grid > 1.0).nonzero()[0].item()  # semantics frozen from the first step starting past 1
    assert torch.equal(traj[after:, :, 4:], traj[after, :, 4:].expand(len(grid) - after, -1, -1, -1, -1))


def test_balanced_labels():
    idx = torch.arange(25)
    labels = balanced_labels(idx, fid_num=23, num_classes=10)
    assert labels[:20].tolist() == [c for c in range(10) for _ in range(2)]
    assert labels[20:23].tolist() == [0, 1, 2]  # remainder cycles through the classes
    assert ((labels[23:] >= 0) & (labels[23:] < 10)).all()
