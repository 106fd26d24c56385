"""Typed config: shipped YAMLs load, and every bad input fails at start-up naming its key."""
import re
from pathlib import Path

import pytest

from sfd_scale.config import ConfigError, config_from_dict, load_config, model_args, sfd_spec
from tools import train as train_tool

# configs/semvae, configs/extract and configs/studies have schemas of their own (tests/data/, tests/test_study.py)
CONFIGS = sorted(str(p) for p in Path("configs").rglob("*.yaml") if not {"semvae", "extract", "studies"} & set(p.parts))
# standalone fragments that need a path or a checkpoint to be complete
NEEDS = {"data.path=/data/latents": lambda p: "experiments" in p or "model/" in p,
         "sample.guide_checkpoint=/ckpt/guide.pt": lambda p: "sample_autoguidance" in p}


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_validate(path):
    extra = [ov for ov, applies in NEEDS.items() if applies(path)]
    if "sample_autoguidance" in path:
        extra.append("data.source=demo")
    cfg = load_config([path], extra)
    model_args(cfg)


def test_xxl_is_the_official_1p0b():
    cfg = load_config(["configs/experiments/sfd_xxl.yaml"], ["data.path=/x"])
    args = model_args(cfg)
    assert (args.depth, args.hidden_size, args.num_heads, args.in_channels) == (24, 1536, 24, 48)
    assert sfd_spec(cfg).is_async and args.dual_time_embed and args.use_repa


@pytest.mark.parametrize("override,match", [
    ("model.hidden=64", "model.hidden"),
    ("train.max_steps=abc", "train.max_steps"),
    ("model.name=LightningDiT-Q/1", "unknown model name"),
    ("sfd.delta_t=1.5", "sfd.delta_t"),
    ("sfd.delta_t=-0.2", "sfd.delta_t"),
    ("model.in_channels=40", "does not add up"),
    ("sample.interval_mode=texture", "interval_mode"),
    ("train.precision=fp8", "train.precision"),
    ("train.compile=maybe", "train.compile"),
    ("train.stop_check_every=0", "train.stop_check_every"),
    ("sample.guidance=autoguidance", "sample.guide_checkpoint"),
])
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(["configs/demo/digits.yaml"], [override])


def test_layout_divisibility_is_the_models_own_rule():
    """validate checks TP / PP divisibility through ModelArgs (config imports nothing from parallel/)."""
    with pytest.raises(ConfigError, match=r"model.num_heads\) = 4 is not divisible by the tensor parallel size 5"):
        load_config(["configs/demo/digits.yaml"], ["parallel.engine=megatron", "parallel.tensor_parallel=5"])
    with pytest.raises(ConfigError, match=r"model depth 4 is not divisible by parallel.pipeline_parallel x "
                                          r"parallel.virtual_stages = 2 x 3"):
        load_config(["configs/demo/digits.yaml"], ["parallel.engine=megatron", "parallel.pipeline_parallel=2",
                                                   "parallel.virtual_stages=3"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config([str(bad)])
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config([str(typo)])


def test_includes_resolve_relative_and_detect_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("includes: [b.yaml]\ntrain:\n  max_steps: 7\n")
    (tmp_path / "b.yaml").write_text("data:\n  source: demo\ntrain:\n  max_steps: 3\n  seed: 5\n")
    cfg = load_config([str(tmp_path / "a.yaml")])
    assert (cfg.train.max_steps, cfg.train.seed) == (7, 5)
    (tmp_path / "b.yaml").write_text("includes: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config([str(tmp_path / "a.yaml")])


def test_config_round_trips_through_a_checkpoint_dict():
    from dataclasses import asdict

    cfg = load_config(["configs/demo/digits.yaml"])
    assert config_from_dict(asdict(cfg), ["train.max_steps=9"]).train.max_steps == 9


def test_train_tool_exits_with_one_clear_line(capsys):
    assert train_tool.main(["--config", "configs/demo/digits.yaml", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "optim.lrr" in err[0]


@pytest.mark.parametrize("override,message", [
    ("train.max_steps=-5", "train.max_steps must be >= 0, got -5"),
    ("train.log_every=0", "train.log_every must be >= 1, got 0"),
    ("train.sample_every=-1", "train.sample_every must be >= 0 (0 = only at the end), got -1"),
    ("train.seed=-3", "train.seed must be >= 0, got -3"),
    ("checkpoint.every=-100", "checkpoint.every must be >= 0 (0 = only at the end), got -100"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last must be >= 1, got -1"),
    ("checkpoint.keep_every=-2", "checkpoint.keep_every must be >= 0 (0 = off), got -2"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0, got -1"),
    ("data.num_workers=-1", "data.num_workers must be >= 0 (0 = the training thread reads), got -1"),
    ("data.demo_samples=0", "data.demo_samples must be >= 1 (or null = all 1797 digits), got 0"),
    ("sample.grid_images=0", "sample.grid_images must be >= 1, got 0"),
])
def test_negative_counts_and_periods_are_refused(override, message, capsys):
    """A negative step count or period used to be accepted (max_steps=-5 wrote a checkpoint of step 0): the tool
    refuses it in one line naming the key and the value, before anything is written."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(["configs/demo/digits.yaml"], [override])
    assert train_tool.main(["--config", "configs/demo/digits.yaml", override, "train.output_dir=/nonexistent/x"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]


def test_each_library_setting_is_declared_once_and_reaches_the_library():
    """The model / sfd / sample sections inherit the library settings classes (one declaration each); every
    other ModelArgs field is derived by ``model_args``; values set in the config reach the library objects."""
    from dataclasses import fields

    from sfd_scale.config import (ModelConfig, SampleConfig, SFDConfig, guidance_config, model_args,
                                  objective_config, sampler_config)
    from sfd_scale.diffusion.guidance import GuidanceConfig
    from sfd_scale.diffusion.sampling import SamplerConfig
    from sfd_scale.diffusion.sfd import ObjectiveConfig
    from sfd_scale.models.lightningdit import ArchitectureOptions, ModelArgs

    for section, libraries in ((ModelConfig, (ArchitectureOptions,)), (SFDConfig, (ObjectiveConfig,)),
                               (SampleConfig, (SamplerConfig, GuidanceConfig))):
        for library in libraries:
            assert issubclass(section, library), (section.__name__, library.__name__)
    derived = {"patch_size", "in_channels", "hidden_size", "depth", "num_heads", "dual_time_embed"}
    assert {f.name for f in fields(ModelArgs)} - {f.name for f in fields(ArchitectureOptions)} == derived

    cfg = load_config(["configs/demo/digits.yaml"],
                      ["model.mlp_ratio=2.0", "model.repa_feature_dim=384", "sfd.repa_weight=0.5",
                       "sample.method=heun2", "sample.atol=1e-5", "sample.guidance=cfg", "sample.cfg_scale=1.7",
                       "sample.cfg_interval_start=0.2", "sample.interval_mode=tex"])
    assert (model_args(cfg).mlp_ratio, model_args(cfg).repa_feature_dim) == (2.0, 384)
    assert objective_config(cfg) == ObjectiveConfig(**{f.name: getattr(cfg.sfd, f.name)
                                                       for f in fields(ObjectiveConfig)})
    assert objective_config(cfg).repa_weight == 0.5
    assert (sampler_config(cfg).method, sampler_config(cfg).atol) == ("heun2", 1e-5)
    assert guidance_config(cfg) == GuidanceConfig("cfg", 1.7, None, None, 0.2, "tex")


def test_library_checks_run_on_the_config_section_with_the_key_named():
    for override, key in (("sample.method=rk45", "sample.method"), ("sample.guidance=classifier", "sample.guidance"),
                          ("sfd.repa_mode=l1", "sfd.repa_mode")):
        with pytest.raises(ConfigError, match=key):
            load_config(["configs/demo/digits.yaml"], [override])


def test_layout_sizes_are_checked_once_for_config_and_layout():
    from sfd_scale.parallel.layout import ParallelLayout

    with pytest.raises(ConfigError, match=r"parallel.virtual_stages > 1 needs parallel.pipeline_parallel >= 2"):
        load_config(["configs/demo/digits.yaml"], ["parallel.virtual_stages=2"])
    with pytest.raises(ConfigError, match=r"parallel.virtual_stages > 1 needs parallel.pipeline_parallel >= 2"):
        ParallelLayout(virtual_stages=2).check(4)
    with pytest.raises(ValueError, match="world size 6 is not divisible"):
        ParallelLayout(tensor_parallel=4).check(6)
