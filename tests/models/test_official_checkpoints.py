"""Official checkpoint containers -> our model and back (golden set A weights, checkpoint_format.json)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from sfd_scale.models.lightningdit import args_for
from sfd_scale.models.official import (args_from_official, build_official, export_official_state_dict,
                                       load_official_state_dict, official_kwargs, read_checkpoint,
                                       sfd_spec_from_official)


@pytest.fixture(scope="module")
def fmt(golden_dir):
    return json.loads((golden_dir / "checkpoint_format.json").read_text())["models_in_this_set"]["main"]


@pytest.fixture(scope="module")
def golden_sd(golden_dir, fmt):
    sd = load_file(str(golden_dir / fmt["weights_file"]))
    assert len(sd) == fmt["num_tensors"]
    return sd


@pytest.fixture(scope="module")
def kwargs(fmt):
    return fmt["constructor_kwargs"]


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def opt_and_config(kwargs):
    """A real AdamW state (exp_avg / exp_avg_sq / step for every trainable parameter of the official
    model, hyper-parameters as train.py sets them) and the training config as an OmegaConf object."""
    model = build_official(**kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, betas=(0.9, 0.95))
    for p in model.parameters():  # a step on given gradients: no forward/backward needed for the state
        if p.requires_grad:
            p.grad = torch.full_like(p, 1e-3)
    opt.step()
    config = OmegaConf.create({"model": {"model_type": "LightningDiT-XL/1", "in_chans": 48, "use_qknorm": True,
                                         "semfirst_delta_t": 0.3, "note": None},
                               "train": {"global_batch_size": 1024, "lrs": [1e-4, 5e-5], "exp_name": "sfd"}})
    assert isinstance(config, DictConfig)
    return opt.state_dict(), config


def train_container(golden_sd, opt_and_config, prefix):
    """What train.py saves: DDP-prefixed model, EMA, optimizer state, the OmegaConf config object."""
    opt, config = opt_and_config
    # "model" differs from "ema" so picking the wrong entry cannot go unnoticed
    trained = {prefix + k: v + 1 if v.is_floating_point() else v for k, v in golden_sd.items()}
    return {"model": trained, "ema": dict(golden_sd), "opt": opt, "config": config}


# ----------------------------------------------------------------------------------------------- (a)
@pytest.mark.parametrize("prefix", ["module.", "module.module."])
def test_train_py_container_loads_under_weights_only_torch(tmp_path, golden_sd, kwargs, opt_and_config, prefix):
    path = tmp_path / "0004000.pt"
    torch.save(train_container(golden_sd, opt_and_config, prefix), path)
    # the hazard this guards against: plain torch.load (weights_only default since 2.6) refuses the file
    assert tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 6)
    with pytest.raises(Exception, match="(?i)omegaconf|weights only"):
        torch.load(path)

    ema = read_checkpoint(path)
    assert_same(ema, golden_sd)
    assert_same(read_checkpoint(path, which="ema"), golden_sd)
    model = read_checkpoint(path, which="model")
    assert set(model) == set(golden_sd)  # prefix stripped, however often it was applied
    for k, v in golden_sd.items():
        assert torch.equal(model[k], v + 1 if v.is_floating_point() else v), k
    net = build_official(**kwargs)
    load_official_state_dict(net, ema)
    assert_same(export_official_state_dict(net), golden_sd)


# ----------------------------------------------------------------------------------------------- (b)
@pytest.mark.parametrize("prefix", ["", "module."])
def test_bare_state_dict_pt(tmp_path, golden_sd, prefix):
    path = tmp_path / "ema.pt"
    torch.save({prefix + k: v for k, v in golden_sd.items()}, path)
    assert_same(read_checkpoint(path), golden_sd)


def test_safetensors_file(golden_dir, golden_sd, fmt):
    assert_same(read_checkpoint(golden_dir / fmt["weights_file"]), golden_sd)
    assert_same(read_checkpoint(golden_dir / fmt["weights_file"], which="model"), golden_sd)  # no container


# ----------------------------------------------------------------------------------------------- (c)
def test_export_round_trip(golden_sd, kwargs, fmt):
    net = build_official(**kwargs)
    load_official_state_dict(net, golden_sd)
    out = export_official_state_dict(net)
    assert set(out) == set(golden_sd)
    assert [k for k in out if k.endswith("_extra_state")] == []
    assert list(out) == [e["key"] for e in fmt["keys_in_state_dict_order"]]  # official order too
    assert_same(out, golden_sd)
    # exported tensors are copies: changing them must not touch the model
    out["pos_embed"].add_(1)
    assert torch.equal(net.pos_embed, golden_sd["pos_embed"])


def test_export_without_copy_gives_the_live_tensors(golden_sd, kwargs):
    net = build_official(**kwargs)
    load_official_state_dict(net, golden_sd)
    live = export_official_state_dict(net, copy=False)
    assert live["pos_embed"].data_ptr() == net.pos_embed.data_ptr() and not live["pos_embed"].requires_grad


@pytest.mark.parametrize("change", [{}, {"use_repa": True, "repa_depth": 4, "repa_dino_version": "dinov2_vitl14"},
                                    {"semfirst_delta_t": 0.0}, {"semantic_chans": 0, "semfirst_delta_t": 0.0}])
def test_official_kwargs_inverts_args_from_official(kwargs, change):
    given = {**kwargs, **change}
    args, spec = args_from_official(**given), sfd_spec_from_official(**given)
    back = official_kwargs(args, spec, use_checkpoint=True)
    assert args_from_official(**back) == args and sfd_spec_from_official(**back) == spec
    assert back["use_checkpoint"] is True


# ----------------------------------------------------------------------------------------------- (d)
def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "0001000.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        read_checkpoint(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("damage", ["truncated", "random-bytes"])
def test_unreadable_files(tmp_path, golden_dir, golden_sd, fmt, suffix, damage):
    if damage == "truncated":
        src = tmp_path / f"full{suffix}"
        torch.save(golden_sd, src) if suffix == ".pt" else save_file(golden_sd, str(src))
        raw = src.read_bytes()
        data = raw[: len(raw) // 2]
    else:
        data = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        data = data.numpy().tobytes()
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"unreadable checkpoint {re.escape(str(path))}"):
        read_checkpoint(path)


def _side_effect(marker: str):  # what a malicious pickle would run on load
    Path(marker).write_text("executed")


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_side_effect, (self.marker,))


@pytest.mark.parametrize("with_config", [False, True], ids=["alone", "next-to-omegaconf"])
def test_pickled_object_is_refused_not_executed(tmp_path, golden_sd, with_config):
    marker = tmp_path / "executed.txt"
    obj = {"ema": dict(golden_sd), "extra": Payload(marker)}
    if with_config:  # the OmegaConf allow-list path must still refuse everything else
        obj["config"] = OmegaConf.create({"a": 1})
    path = tmp_path / "evil.pt"
    torch.save(obj, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_checkpoint(path)
    assert not marker.exists()


def test_container_without_requested_entry(tmp_path, golden_sd):
    path = tmp_path / "model_only.pt"
    torch.save({"model": dict(golden_sd), "opt": {}}, path)
    with pytest.raises(KeyError, match="'ema'"):
        read_checkpoint(path)
    assert_same(read_checkpoint(path, which="model"), golden_sd)

    path = tmp_path / "neither.pt"
    torch.save({"opt": {"state": {}, "param_groups": []}, "steps": 5}, path)
    for which in ("ema", "model"):
        with pytest.raises((KeyError, ValueError), match=f"no '{which}' entry"):
            read_checkpoint(path, which=which)
    with pytest.raises(ValueError, match="which must be"):
        read_checkpoint(path, which="opt")


def _fit_error(net, sd, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        load_official_state_dict(net, sd)


def test_state_dict_mismatches(golden_sd, kwargs):
    net = build_official(**kwargs)
    missing = {k: v for k, v in golden_sd.items() if k != "blocks.2.attn.qkv.weight"}
    _fit_error(net, missing, "missing keys ['blocks.2.attn.qkv.weight']")
    extra = {**golden_sd, "blocks.4.attn.qkv.weight": torch.zeros(1)}
    _fit_error(net, extra, "unexpected keys ['blocks.4.attn.qkv.weight']")
    wrong = {**golden_sd, "final_layer.linear.weight": torch.zeros(32, 192)}
    _fit_error(net, wrong, "final_layer.linear.weight: checkpoint (32, 192) vs model (48, 192)")
    # nothing was loaded by the failed attempts: the weights are still the fresh init
    assert not torch.equal(net.state_dict()["blocks.0.attn.qkv.weight"], golden_sd["blocks.0.attn.qkv.weight"])


def test_unknown_model_name():
    for name in ("LightningDiT-XXXL/1", "LightningDiT-XL/4", "DiT-XL/2", "XL"):
        with pytest.raises(ValueError, match=f"unknown model name {re.escape(repr(name))}"):
            args_for(name)


def test_unknown_official_kwarg(kwargs):
    with pytest.raises(TypeError, match="use_flash"):
        args_from_official(**kwargs, use_flash=True)


@pytest.mark.parametrize("dt", [1.0, 1.5, -0.1])
def test_delta_t_outside_open_interval(kwargs, dt):
    with pytest.raises(ValueError, match="delta_t must lie in the open interval"):
        sfd_spec_from_official(**{**kwargs, "semfirst_delta_t": dt})


@pytest.mark.parametrize("sem", [48, 60, -1])
def test_channel_split_does_not_add_up(kwargs, sem):
    bad = {**kwargs, "semantic_chans": sem}
    with pytest.raises(ValueError, match="channel split does not add up"):
        sfd_spec_from_official(**bad)
    with pytest.raises(ValueError, match="channel split does not add up"):
        build_official(**bad)
