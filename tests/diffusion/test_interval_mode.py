"""The guidance interval mode travels with the model (#17): an official model built with
``semfirst_infer_interval_mode='tex'`` (or 'sem') and sampled through the documented API with no extra
argument gives the official ``forward_with_cfg`` / ``forward_with_autoguidance`` outputs of that mode.

The golden set was made in 'both' mode; here the official code itself (``../shared/reference``) is the
reference, run on the golden weights and inputs with the other modes."""
import pytest
import torch

from sfd_scale.bench.official_step import import_official
from sfd_scale.diffusion.guidance import autoguidance_velocity, cfg_velocity
from sfd_scale.diffusion.official import guidance_from_official
from sfd_scale.models.official import build_official, load_official_state_dict, read_checkpoint, sfd_spec_from_official
from tests import golden
from tests.golden import FORWARD_TOL, max_err

pytestmark = pytest.mark.usefixtures("single_thread")


def _official(lightningdit, golden_dir, name, mode):
    entry = golden.config(golden_dir)["models"][name]
    net = lightningdit.LightningDiT(**{**entry["kwargs"], "semfirst_infer_interval_mode": mode})
    net.load_state_dict(read_checkpoint(golden_dir / entry["weights_file"]), strict=True)
    return net.eval()


def _ours(golden_dir, name, mode):
    kwargs = {**golden.config(golden_dir)["models"][name]["kwargs"], "semfirst_infer_interval_mode": mode}
    net = build_official(**kwargs)
    entry = golden.config(golden_dir)["models"][name]
    load_official_state_dict(net, read_checkpoint(golden_dir / entry["weights_file"]))
    return net.eval(), sfd_spec_from_official(**kwargs)


@pytest.mark.parametrize("mode", ["tex", "sem"])
def test_official_interval_mode_reaches_cfg_and_autoguidance(golden_dir, official_code, mode):
    lightningdit, _ = import_official(official_code)
    entry = golden.config(golden_dir)["models"]["main"]
    official, (ours, spec) = _official(lightningdit, golden_dir, "main", mode), _ours(golden_dir, "main", mode)
    assert spec.interval_mode == mode
    official_guide, (guide, _) = _official(lightningdit, golden_dir, "guide", mode), _ours(golden_dir, "guide", mode)
    g = golden.tensors(golden_dir, entry["cfg_file"])
    # both parts below the interval start: each mode holds back other parts ('both': both)
    t = tuple(torch.full((g["x"].shape[0],), v) for v in (0.05, 0.2))
    case = next(c for c in entry["cfg"]["cases"] if c["cfg_interval"])
    args = {k: case[k] for k in ("cfg_scale", "cfg_interval", "cfg_interval_start")}
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):  # eager, as the golden set was made
        want = official.forward_with_cfg(g["x"], t, g["y"], **args)
        got = cfg_velocity(ours, spec, g["x"], t, g["y"], guidance_from_official(guidance="cfg", **args))
        both = cfg_velocity(ours, spec, g["x"], t, g["y"], guidance_from_official(
            guidance="cfg", **args, semfirst_infer_interval_mode="both"))
    assert max_err(got, want) <= FORWARD_TOL
    assert max_err(both, want) > 1e-3  # the mode changes this case: the check above is not vacuous

    a = golden.tensors(golden_dir, entry["ag_file"])
    t = tuple(torch.full((a["x"].shape[0],), v) for v in (0.05, 0.2))
    case = next(c for c in entry["ag"]["cases"] if c["cfg_interval"])
    args = {k: case[k] for k in ("cfg_scale", "cfg_interval", "cfg_interval_start", "cfg_scale_sem", "cfg_scale_tex")}
    assert float(t[1][0]) < case["cfg_interval_start"]
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):
        want = official.forward_with_autoguidance(a["x"], t, a["y"], autoguidance_model=official_guide, **args)
        got = autoguidance_velocity(ours, guide, spec, a["x"], t, a["y"],
                                    guidance_from_official(guidance="autoguidance", **args))
        both = autoguidance_velocity(ours, guide, spec, a["x"], t, a["y"], guidance_from_official(
            guidance="autoguidance", **args, semfirst_infer_interval_mode="both"))
    assert max_err(got, want) <= FORWARD_TOL
    assert max_err(both, want) > 1e-3
