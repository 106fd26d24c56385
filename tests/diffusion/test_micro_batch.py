"""The one micro-batch type: cutting it, filling it with the keyed draws, and the objective hook that reads it."""
import torch

from sfd_scale.diffusion import keyed_noise
from sfd_scale.diffusion.micro_batch import MicroBatch, TrainingDraws
from sfd_scale.diffusion.sfd import ObjectiveConfig, SFDObjective, SFDSpec


def _batch(n=6, repa=True):
    g = torch.Generator().manual_seed(3)
    return MicroBatch(x1=torch.randn(n, 6, 4, 4, generator=g), y=torch.arange(n), t_base=torch.rand(n, generator=g),
                      x0=torch.randn(n, 6, 4, 4, generator=g),
                      repa_target=torch.randn(n, 8, 4, 4, generator=g) if repa else None)


def test_rows_cut_every_field_and_keep_a_missing_target_missing():
    batch = _batch()
    part = batch.rows(2, 5)
    assert part.size == 3 and batch.size == 6
    for name in ("x1", "y", "t_base", "x0", "repa_target"):
        assert torch.equal(getattr(part, name), getattr(batch, name)[2:5]), name
    assert _batch(repa=False).rows(0, 2).repa_target is None


def test_draws_are_the_keyed_draws_with_dropped_labels_set_to_the_null_class():
    x1, label, index = torch.randn(64, 6, 4, 4), torch.randint(0, 10, (64,)), torch.arange(100, 164)
    draws = TrainingDraws(5, lognorm=True, label_dropout=0.5, null_label=10)
    batch = draws(7, x1, label, index, repa_target=None)
    t_base, x0, drop = keyed_noise.keyed_draws(5, 7, index, (6, 4, 4), lognorm=True, dropout=0.5)
    assert torch.equal(batch.t_base, t_base) and torch.equal(batch.x0, x0) and batch.x1 is x1
    assert 0 < int(drop.sum()) < 64  # some labels dropped, some kept
    assert torch.equal(batch.y, torch.where(drop, torch.full_like(label, 10), label))
    assert batch.repa_target is None
    # a sample draws the same whichever micro-batch it is in: cutting after drawing = drawing the part
    part = draws(7, x1[8:16], label[8:16], index[8:16])
    assert all(torch.equal(getattr(part, k), getattr(batch.rows(8, 16), k)) for k in ("y", "t_base", "x0"))
    assert draws(7, x1.bfloat16(), label, index).x0.dtype == torch.bfloat16  # noise in the latents' dtype


def test_objective_hook_is_loss_terms_of_the_micro_batch():
    objective = SFDObjective(SFDSpec(texture_chans=4, semantic_chans=2, delta_t=0.3), ObjectiveConfig())
    batch = _batch(repa=False)
    weight = torch.randn(6, 6)

    def model(x, t, y):  # any callable model(x, t, y) -> velocity
        return torch.einsum("oc,bchw->bohw", weight, x)

    hook = objective(model, batch)
    direct = objective.loss_terms(model, batch.x1, batch.y, t_base=batch.t_base, x0=batch.x0)
    assert hook.keys() == direct.keys()
    assert all(torch.equal(hook[k], direct[k]) for k in hook if torch.is_tensor(hook[k]))
