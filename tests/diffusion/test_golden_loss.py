"""Every loss term of SFDObjective with the golden pinned t and noise == official training_losses."""
import pytest
import torch

from sfd_scale.diffusion.official import objective_from_official
from sfd_scale.diffusion.sfd import SFDObjective
from tests import golden
from tests.golden import FORWARD_TOL, max_err

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def terms(golden_dir):
    entry = golden.config(golden_dir)["models"]["main"]
    g = golden.tensors(golden_dir, entry["loss_file"])
    model, spec = golden.build(golden_dir)
    model.train()
    model.y_embedder.dropout_prob = 0.0  # the golden run switched label dropout off
    objective = SFDObjective(spec, objective_from_official(**entry["loss"]["transport"]))
    repa = g["feature_dino_fp16"].float() if "feature_dino_fp16" in g else None
    with torch.no_grad():
        out = objective.loss_terms(model, g["x1"], g["y"], t_base=g["t_base"], x0=g["x0"], repa_target=repa)
    return out, g


@pytest.mark.parametrize("key", ["t_tex", "t_sem", "t", "xt", "ut", "pred", "loss", "cos_loss", "repa_loss"])
def test_term(terms, key):
    out, g = terms
    if key not in g:
        assert key not in out or key == "t", f"golden set has no {key!r} but our objective produced it"
        return
    assert max_err(out[key], g[key]) <= FORWARD_TOL, key


def test_total(terms):
    out, g = terms
    assert max_err(out["total"], g["total_loss"]) <= FORWARD_TOL


def test_semantic_weight_matters(terms, golden_dir):
    """The stored loss distinguishes weight 2 from weight 1 (the test above could otherwise not fail)."""
    out, g = terms
    spec = golden.build(golden_dir)[1]
    from sfd_scale.diffusion.sfd import weighted_mse
    plain = weighted_mse(spec, out["pred"], out["ut"], 1.0)
    assert max_err(plain, g["loss"]) > 1e-3
