"""Counter-based keyed draws: a pure function of (seed, step, index), with the right distributions."""
import math

import pytest
import torch

from sfd_scale.diffusion import keyed_noise as kn
from sfd_scale.diffusion.sfd import base_time_from_draws, sample_base_time


def _draws(seed=0, step=0, index=None, shape=(6, 8, 8), lognorm=True, dropout=0.1):
    index = torch.arange(64) if index is None else index
    return kn.keyed_draws(seed, step, index, shape, lognorm=lognorm, dropout=dropout)


def test_host_and_device_mixers_agree_and_stay_in_32_bits():
    x = torch.tensor([0, 1, 2, 12345, 2 ** 31, 2 ** 32 - 1], dtype=torch.int64)
    mixed = kn._mix_(x.clone())
    assert mixed.tolist() == [kn._mix_int(v) for v in x.tolist()]
    assert int(mixed.min()) >= 0 and int(mixed.max()) < 2 ** 32
    assert kn._fold(torch.tensor([7]), torch.tensor([2 ** 40 + 3]))[0].item() == kn._fold_int(7, 2 ** 40 + 3)
    with pytest.raises(ValueError, match="step >= 0"):
        kn.sample_keys(0, -1, torch.arange(2))


def test_a_sample_draws_the_same_whatever_batch_it_is_in():
    """Keyed by the index alone: a rank holding samples 40..47 draws what a whole batch draws for them."""
    t, x0, drop = _draws()
    t8, x8, d8 = _draws(index=torch.arange(40, 48))
    assert torch.equal(t8, t[40:48]) and torch.equal(x8, x0[40:48]) and torch.equal(d8, drop[40:48])
    again = _draws()
    assert all(torch.equal(a, b) for a, b in zip(again, (t, x0, drop)))
    assert t.dtype == x0.dtype == torch.float32 and drop.dtype == torch.bool and x0.shape == (64, 6, 8, 8)


def test_independent_across_index_step_and_seed():
    base = _draws()[1].flatten(1)
    for other in (_draws(step=1)[1].flatten(1), _draws(seed=1)[1].flatten(1),
                  _draws(index=torch.arange(64, 128))[1].flatten(1)):
        corr = torch.corrcoef(torch.stack([base.flatten(), other.flatten()]))[0, 1]
        assert abs(corr.item()) < 0.02  # 24576 pairs: 3 sigma ~ 0.019
    # neighbouring samples and the two Box-Muller outputs of a pair are uncorrelated too
    assert abs(torch.corrcoef(torch.stack([base[:-1].flatten(), base[1:].flatten()]))[0, 1].item()) < 0.02
    pairs = base.view(64, -1, 2)
    assert abs(torch.corrcoef(pairs.reshape(-1, 2).T)[0, 1].item()) < 0.03


def test_normals_uniforms_and_base_time_distributions():
    keys = kn.sample_keys(3, 5, torch.arange(200))
    z = kn.normals(keys, kn.STREAM_NOISE, 501).flatten()  # odd count: the last pair's second output dropped
    assert z.numel() == 200 * 501
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1.0) < 0.01
    assert abs((z.abs() < 1.0).double().mean().item() - 0.6827) < 0.005  # normal, not just unit variance
    u = kn.uniforms(keys, kn.STREAM_DROP, 500).flatten()
    assert 0.0 < u.min().item() and u.max().item() < 1.0
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    expected = u.numel() / 20
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 43.8  # chi-square, 19 degrees of freedom, p = 0.001
    # logit-normal base time: sigmoid(N(0,1)) quantiles; uniform base time: U(0,1) quantiles
    t = _draws(index=torch.arange(20000), shape=(1,))[0].double()
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    normal_q = torch.distributions.Normal(0.0, 1.0).icdf(qs)
    assert torch.allclose(torch.quantile(t, qs), torch.sigmoid(normal_q), atol=0.01)
    tu = _draws(index=torch.arange(20000), shape=(1,), lognorm=False)[0].double()
    assert torch.allclose(torch.quantile(tu, qs), qs, atol=0.01)


def test_label_dropout_rate():
    drop = _draws(index=torch.arange(20000), shape=(1,), dropout=0.1)[2]
    assert abs(drop.double().mean().item() - 0.1) < 0.007  # 3 sigma of a binomial(20000, 0.1) rate
    assert not _draws(dropout=0.0)[2].any()


def test_base_time_transform_is_the_generator_path():
    """``sample_base_time`` and the keyed draws share one transform (sfd.py)."""
    g = torch.Generator().manual_seed(0)
    n = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(sample_base_time(16, lognorm=True, generator=g), base_time_from_draws(n, lognorm=True))
    assert math.isclose(base_time_from_draws(torch.zeros(1, dtype=torch.float64), lognorm=True).item(), 0.5)
